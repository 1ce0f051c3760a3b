"""Weight gradients added to Megatron's main gradients inside the GEMM: gradient-accumulation fusion without apex.

With ``--gradient-accumulation-fusion`` Megatron-Core's linear layers (``ColumnParallelLinear``,
``RowParallelLinear``, the output layer) hand each weight gradient to apex's ``fused_weight_gradient_mlp_cuda``:
``wgrad_gemm_accum_fp32(input, grad_output, main_grad)`` computes ``main_grad += grad_output^T @ input`` as one
cuBLAS call that adds into the fp32 buffer (beta = 1). Without it the layer writes a bf16 ``weight.grad``, and
Megatron's DDP hook reads it back and adds it into ``main_grad`` with a second kernel (and the autograd engine keeps
the bf16 gradient alive until then). Megatron refuses the flag when apex is missing;
``patches/core_v0.19.0-wgrad-accum-fusion.patch`` makes it use this module instead, which has apex's two functions
and does the same through torch: ``torch.addmm(main_grad, grad_output^T, input, out_dtype=float32,
out=main_grad)``, cuBLAS's bf16 x bf16 -> fp32 product with beta = 1 (torch's CUDA ``addmm.dtype_out``).

Shapes (Megatron flattens sequence and batch first): ``input`` ``[t, k]``, ``grad_output`` ``[t, n]``,
``main_grad`` ``[n, k]`` (the weight's shape), all on one device.
"""

import torch

__all__ = ["wgrad_accum_reference", "wgrad_gemm_accum_fp16", "wgrad_gemm_accum_fp32"]


def wgrad_accum_reference(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ input``, the product in fp32, then added."""
    main_grad.add_((grad_output.t().float() @ input.float()).to(main_grad.dtype))


def _check(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor, dtypes: tuple) -> None:
    if input.dim() != 2 or grad_output.dim() != 2:
        raise ValueError(
            f"input {tuple(input.shape)} and grad_output {tuple(grad_output.shape)}: expected 2-D [tokens, features]"
        )
    t, k = input.shape
    if grad_output.shape[0] != t or tuple(main_grad.shape) != (grad_output.shape[1], k):
        raise ValueError(
            f"input {tuple(input.shape)}, grad_output {tuple(grad_output.shape)}, main_grad {tuple(main_grad.shape)}: "
            f"expected [t, k], [t, n] and [n, k]"
        )
    if main_grad.dtype not in dtypes:
        raise ValueError(f"main_grad of dtype {main_grad.dtype}: expected one of {dtypes}")
    if input.dtype != grad_output.dtype:
        raise ValueError(f"input {input.dtype} and grad_output {grad_output.dtype}: expected one dtype")
    if not (input.device == grad_output.device == main_grad.device):
        raise ValueError(
            f"input on {input.device}, grad_output on {grad_output.device}, main_grad on {main_grad.device}: "
            "expected one device"
        )


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ input`` into an fp32 ``main_grad`` (apex's function of the same name).

    bf16 / fp16 operands on CUDA: one cuBLAS GEMM with fp32 output and beta = 1 (the product is never rounded to
    bf16). fp32 operands: ``addmm`` in place. Mixed operands on a CPU (torch has no mixed-precision ``addmm`` there):
    the reference.
    """
    _check(input, grad_output, main_grad, (torch.float32,))
    if input.dtype == torch.float32:
        main_grad.addmm_(grad_output.t(), input)
    elif main_grad.is_cuda:
        torch.addmm(main_grad, grad_output.t(), input, out_dtype=torch.float32, out=main_grad)
    else:
        wgrad_accum_reference(input, grad_output, main_grad)


def wgrad_gemm_accum_fp16(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ input`` into a bf16 or fp16 ``main_grad`` of the operands' dtype (apex's
    function of the same name; Megatron calls it when gradients are accumulated in the model's dtype): one GEMM with
    beta = 1, rounded once."""
    _check(input, grad_output, main_grad, (torch.float16, torch.bfloat16))
    if input.dtype != main_grad.dtype:
        raise ValueError(f"operands of dtype {input.dtype}, main_grad {main_grad.dtype}: expected the same dtype")
    main_grad.addmm_(grad_output.t(), input)
