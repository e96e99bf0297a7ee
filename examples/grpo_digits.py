"""GRPO on a verifiable task: a tiny autoregressive policy learns to copy a digit string, trained
with fusedloss's group_advantages and policy_loss.

Each prompt is a random string of ``--length`` digits. The policy writes a response one digit at a
time: a small MLP reads the prompt, the position and the previous digit, and its linear head gives
the next digit's logits. The reward of a response is the fraction of positions where it copies the
prompt, so it can be checked exactly. Each step samples ``--group`` responses per prompt, turns
their rewards into group-relative advantages (``group_advantages``) and takes PPO-style updates
with ``policy_loss`` (clip-higher, token-mean aggregation, as in DAPO). The per-token log-probs come
straight from the LM head through ``linear_logprob``, which never materialises the logits.

    python examples/grpo_digits.py [--steps 1500] [--prompts 16] [--group 8] [--length 4] [--plot grpo_digits.png]

It prints the mean reward as it rises and saves the reward curve.

Measured with the defaults (seed 0, 16 prompts × 8 samples, 4 digits, 1500 steps) on the 2-core CPU
machine, one torch thread, torch 2.13.0+cpu, 2026-12-02: the mean reward rose from 0.14 over the
first 10 steps (chance is 0.1) to 0.78 over the last 10, in 30 s of training.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fusedloss as fl

DIGITS = 10


class Policy(nn.Module):
    """``logits[t] = head(mlp(prompt, position t, previous digit))``: autoregressive over the response."""

    def __init__(self, length: int, width: int = 128):
        super().__init__()
        self.length = length
        self.body = nn.Sequential(nn.Linear(length * DIGITS + length + DIGITS + 1, width), nn.Tanh(),
                                  nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, DIGITS)

    def features(self, prompt: torch.Tensor, prev: torch.Tensor, t: int) -> torch.Tensor:
        B = prompt.shape[0]
        pos = torch.zeros(B, self.length, device=prompt.device)
        pos[:, t] = 1.0
        prev_1h = torch.zeros(B, DIGITS + 1, device=prompt.device).scatter_(1, prev[:, None], 1.0)  # index 10: start
        prompt_1h = nn.functional.one_hot(prompt, DIGITS).flatten(1).float()
        return torch.cat([prompt_1h, pos, prev_1h], dim=1)

    def hidden(self, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        """Teacher-forced last hidden states of every response position: ``[B, T, width]``."""
        B, T = response.shape
        prev = torch.cat([torch.full((B, 1), DIGITS, device=prompt.device), response[:, :-1]], dim=1)
        feats = torch.stack([self.features(prompt, prev[:, t], t) for t in range(T)], dim=1)
        return self.body(feats)

    @torch.no_grad()
    def sample(self, prompt: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        B = prompt.shape[0]
        prev = torch.full((B,), DIGITS, dtype=torch.long, device=prompt.device)
        out = []
        for t in range(self.length):
            probs = torch.softmax(self.head(self.body(self.features(prompt, prev, t))), dim=-1)
            prev = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            out.append(prev)
        return torch.stack(out, dim=1)


def token_logprobs(policy: Policy, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """``log π(response[t] | ...)`` of each sampled token, from the LM head by ``linear_logprob``."""
    return fl.linear_logprob(policy.hidden(prompt, response), policy.head.weight, response, bias=policy.head.bias,
                             check_inputs=False)


def train(steps: int = 1500, prompts: int = 16, group: int = 8, length: int = 4, epochs: int = 2, lr: float = 1e-2,
          seed: int = 0, device: str = "cpu", progress: bool = True, plot: str | None = None) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    policy = Policy(length).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    curve = []
    start = time.perf_counter()
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="GRPO", unit="step", mininterval=0.5)
    for _ in bar:
        prompt = torch.randint(0, DIGITS, (prompts, length), generator=g, device=device).repeat_interleave(group, 0)
        response = policy.sample(prompt, g)
        reward = (response == prompt).float().mean(dim=1)  # verifiable: the fraction of digits copied
        adv = fl.group_advantages(reward, group)
        mask = torch.ones_like(response, dtype=torch.bool)
        with torch.no_grad():
            old = token_logprobs(policy, prompt, response)
        for _ in range(epochs):
            loss, metrics = fl.policy_loss(token_logprobs(policy, prompt, response), old, adv, mask,
                                           clip_low=0.2, clip_high=0.28, loss_agg="token-mean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        curve.append(float(reward.mean()))
        if progress:
            bar.set_postfix(reward=f"{curve[-1]:.2f}", clipfrac=f"{metrics['pg_clipfrac']:.2f}")
    if plot:
        _plot(curve, plot)
    return {"curve": curve, "seconds": time.perf_counter() - start}


def _plot(curve, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (fraction copied)")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="GRPO steps (a sampling round and its updates each)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="responses sampled per prompt (the GRPO group)")
    ap.add_argument("--length", type=int, default=4, help="digits per prompt and response")
    ap.add_argument("--seed", type=int, default=0, help="seeds the prompts, the sampling and the network")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads; the network is tiny, so one is enough")
    ap.add_argument("--plot", default="grpo_digits.png", help="where the reward curve goes")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    r = train(args.steps, args.prompts, args.group, args.length, seed=args.seed, device=args.device, plot=args.plot)
    c = r["curve"]
    print(f"mean reward {sum(c[:10]) / 10:.2f} over the first 10 steps -> {sum(c[-10:]) / 10:.2f} over the last 10, "
          f"in {r['seconds']:.0f} s; reward curve: {args.plot}")
    return r


if __name__ == "__main__":
    main()
