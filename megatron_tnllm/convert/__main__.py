import sys

from megatron_tnllm.convert.cli import main

sys.exit(main())
