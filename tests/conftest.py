import os

# Megatron's weightless norms and fused helpers go through torch.compile, which takes ~50 s per
# shape on two cores; the tests check numbers, not compilation. Set before torch is imported, so
# spawned workers inherit it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
