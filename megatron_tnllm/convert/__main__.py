import logging
import sys
import warnings

# Megatron-Core announces at import that Transformer Engine, apex and absl are absent; the converter needs none
# of them, and its errors are meant to be one line.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|transformer-engine|Apex|absl)", category=UserWarning)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from megatron_tnllm.convert.cli import main  # noqa: E402

sys.exit(main())
