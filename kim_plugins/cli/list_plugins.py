"""List every name kim_plugins registers (timm models, mmseg modules) and every config.

    python tools/list_plugins.py            # Markdown tables (what README.md shows)
    python tools/list_plugins.py --json     # machine-readable

The tables are read from the live registries after ``import kim_plugins.mmseg``,
so they cannot drift from the code; ``tests/test_readme.py`` checks that the
README lists every name printed here.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Dict, List

from kim_plugins.cli.common import REPO_ROOT as ROOT
from kim_plugins.markdown import markdown_table


def registered_names() -> Dict[str, List[Dict[str, str]]]:
    """Registry -> [{name, module, summary}] for every object defined in kim_plugins."""
    import timm

    import kim_plugins.mmseg  # noqa: F401  registers everything
    from mmseg import registry as mmseg_registry

    out: Dict[str, List[Dict[str, str]]] = {"timm": []}
    for name in sorted(timm.list_models()):
        fn = timm.models.model_entrypoint(name)
        module = getattr(fn, "__module__", "")
        if module.startswith("kim_plugins."):
            out["timm"].append(dict(name=name, module=module, summary=_summary(fn)))
    for reg_name in ("MODELS", "HOOKS", "DATASETS", "MODEL_WRAPPERS", "TRANSFORMS", "OPTIM_WRAPPERS",
                     "OPTIM_WRAPPER_CONSTRUCTORS", "LOOPS"):
        reg = getattr(mmseg_registry, reg_name, None)
        # mmseg's registry and its mmengine parent (where scope-free modules register).
        for scope, r in (("mmseg", reg), ("mmengine", getattr(reg, "parent", None))):
            if r is None:
                continue
            rows = [dict(name=name, module=obj.__module__, summary=_summary(obj))
                    for name, obj in sorted(r.module_dict.items())
                    if getattr(obj, "__module__", "").startswith("kim_plugins.")]
            if rows:
                out[f"{scope}.{reg_name}"] = rows
    return out


def _summary(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0].rstrip(".") if doc else ""


def config_files() -> List[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"),
                                                              recursive=True)
                  if f"{os.sep}_base_{os.sep}" not in p)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = registered_names()
    configs = config_files()
    if args.json:
        print(json.dumps(dict(registries=names, configs=configs), indent=1))
        return 0
    for reg, rows in names.items():
        table = markdown_table([dict(name=f"`{r['name']}`", module=f"`{r['module']}`", summary=r["summary"])
                                for r in rows], headers=["name", "defined in", "what it is"])
        print(f"\n**{reg}**\n\n{table}")
    print(f"\n**configs** ({len(configs)})\n")
    for c in configs:
        print(f"- `{c}`")
    return 0
