"""The files of an exported Hugging Face directory other than the weights.

An export loads with only torch and transformers (and sentencepiece for the tokenizer) installed:

* ``configuration_transnormer.py`` and ``tokenization_transnormer.py`` are copied as they are (they import
  nothing from this repository);
* ``modeling_transnormer.py`` is generated from this package's module: its block of ``megatron_tnllm`` imports
  is replaced by the source of those functions (slopes, LRPE, the PyTorch lightning attention, SRMSNorm, the
  decode step's products), cut from their modules with ``ast``. The Triton kernels are still used when
  ``megatron_tnllm`` happens to be importable. So the repository keeps a single copy of every line; exports are
  a build product.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
from pathlib import Path

from transformers import GenerationConfig

from megatron_tnllm.hf import configuration_transnormer, modeling_transnormer, tokenization_transnormer
from megatron_tnllm.hf.configuration_transnormer import TransnormerConfig
from megatron_tnllm.ops import decay, lrpe
from megatron_tnllm.ops.lightning_attn import naive as attention_reference
from megatron_tnllm.ops.skinny_linear import naive as skinny_reference
from megatron_tnllm.ops.srmsnorm import naive as srmsnorm_reference

__all__ = ["standalone_modeling_source", "write_export_files"]

AUTO_MAP = {
    "AutoConfig": "configuration_transnormer.TransnormerConfig",
    "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_transnormer.TransnormerTokenizer", None]}

_IMPORT_BLOCK = re.compile(r"# --- standalone imports: begin ---\n.*?# --- standalone imports: end ---\n", re.S)

# The functions the model imports from megatron_tnllm; whatever they call in their modules comes along.
_INLINED = (
    (decay, ("layer_slopes",)),
    (lrpe, ("lrpe_theta_init", "apply_lrpe")),
    (attention_reference, ("lightning_attention_chunked", "lightning_attention_step_torch")),
    (srmsnorm_reference, ("srmsnorm_torch", "srmsnorm_gate_torch")),
    (skinny_reference, ("skinny_linear_torch", "skinny_glu_torch")),
)

_STANDALONE_TAIL = """
try:  # the Triton kernels, when megatron-tnllm is installed
    from megatron_tnllm.ops import (
        lightning_attention,
        lightning_attention_step,
        skinny_glu,
        skinny_linear,
        srmsnorm,
        srmsnorm_gate,
    )
except ImportError:
    lightning_attention = lightning_attention_chunked
    lightning_attention_step = lightning_attention_step_torch
    skinny_glu = skinny_glu_torch
    skinny_linear = skinny_linear_torch
    srmsnorm = srmsnorm_torch
    srmsnorm_gate = srmsnorm_gate_torch
"""


def _module_code(module, roots: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(import lines, definitions) of ``module`` that ``roots`` need: the roots and every top-level function, class
    or constant they reach by name, in source order, decorators included."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):  # classes: e.g. autograd Functions
            defined[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name) and target.id != "__all__":
                    defined[target.id] = node
    missing = [n for n in roots if n not in defined]
    if missing:
        raise RuntimeError(f"{module.__name__} no longer defines {missing}; update megatron_tnllm.hf.export._INLINED")
    needed, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(n.id for n in ast.walk(defined[name]) if isinstance(n, ast.Name) and n.id in defined)
    imports = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "module", None) != "__future__":
            if any(alias.name.startswith("megatron") for alias in node.names) or (
                getattr(node, "module", None) or ""
            ).startswith("megatron"):
                raise RuntimeError(f"{module.__name__} imports from megatron; it cannot be inlined into an export")
            imports.append(ast.get_source_segment(source, node))
    definitions = []
    for node in dict.fromkeys(defined[n] for n in sorted(needed, key=lambda n: defined[n].lineno)):
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        definitions.append("\n".join(lines[first - 1 : node.end_lineno]))
    return imports, definitions


def standalone_modeling_source() -> str:
    """``modeling_transnormer.py`` with its ``megatron_tnllm`` imports replaced by the code they import."""
    imports, definitions = [], []
    for module, roots in _INLINED:
        module_imports, module_definitions = _module_code(module, roots)
        imports.extend(i for i in module_imports if i not in imports)
        definitions.extend(module_definitions)
    header = "# --- copied from megatron_tnllm by megatron_tnllm/hf/export.py: the PyTorch reference operators ---"
    block = "\n".join([header, *imports]) + "\n\n\n" + "\n\n\n".join(definitions) + "\n\n" + _STANDALONE_TAIL + "\n"
    source = inspect.getsource(modeling_transnormer)
    if not _IMPORT_BLOCK.search(source):
        raise RuntimeError("modeling_transnormer.py lost its '# --- standalone imports' markers")
    return _IMPORT_BLOCK.sub(lambda _: block, source, count=1)


def write_export_files(
    directory: Path, config: TransnormerConfig, dtype: str, tokenizer_model: Path | None = None
) -> None:
    """Writes config.json (with auto_map), generation_config.json, the code files and, given a SentencePiece
    model, the tokenizer files into ``directory``. ``dtype`` ("bfloat16", ...) is recorded as the weights' dtype."""
    directory = Path(directory)
    config = TransnormerConfig.from_dict(config.to_dict())
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["TransnormerForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(directory)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(directory)
    shutil.copyfile(inspect.getfile(configuration_transnormer), directory / "configuration_transnormer.py")
    (directory / "modeling_transnormer.py").write_text(standalone_modeling_source())
    if tokenizer_model is not None:
        write_tokenizer_files(directory, Path(tokenizer_model))


def write_tokenizer_files(directory: Path, tokenizer_model: Path) -> None:
    """tokenizer.model, tokenizer_config.json (auto_map to the copied tokenization file), special_tokens_map.json."""
    tokenizer = tokenization_transnormer.TransnormerTokenizer(vocab_file=str(tokenizer_model))
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.update(
        auto_map=TOKENIZER_AUTO_MAP,
        tokenizer_class="TransnormerTokenizer",
        add_bos_token=tokenizer.add_bos_token,
        add_eos_token=tokenizer.add_eos_token,
    )
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    shutil.copyfile(inspect.getfile(tokenization_transnormer), directory / "tokenization_transnormer.py")
