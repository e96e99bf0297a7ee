import os
import sys

import torch

# The Triton interpreter must be on before triton.language is imported (importing fusedloss
# pulls in torch._dynamo, which imports it), so decide here, before anything else is loaded.
if "--device" in sys.argv:
    _cpu = sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]
else:
    _cpu = not torch.cuda.is_available()
if _cpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .cli import main  # noqa: E402

sys.exit(main())
