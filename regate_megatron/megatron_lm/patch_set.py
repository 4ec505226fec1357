"""The ``patches/`` set for a Megatron-LM checkout, from its ``megatron/core/package_info.py``.

``patches/core_vX.Y.Z`` fits version X.Y.Z; a checkout of a later patch release of X.Y with
no set of its own takes the newest earlier X.Y set (the ``core_v0.19.0`` tag's
package_info already reads 0.19.1). Stdlib only, so the shell scripts run it as a file::

    python regate_megatron/megatron_lm/patch_set.py CHECKOUT   # prints the set's folder
"""

import os
import re
import sys

PATCHES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "patches")


def checkout_version(checkout: str) -> tuple:
    with open(os.path.join(checkout, "megatron", "core", "package_info.py")) as f:
        text = f.read()
    return tuple(int(re.search(rf"^{k}\s*=\s*(\d+)", text, re.M).group(1))
                 for k in ("MAJOR", "MINOR", "PATCH"))


def _version(name: str) -> tuple:
    return tuple(int(x) for x in name[len("core_v"):].split("."))


def patch_set(checkout: str, patches: str = PATCHES) -> str:
    """The folder of the patch set for ``checkout``; ValueError (one line) if none fits."""
    major, minor, patch = checkout_version(checkout)
    sets = sorted(d for d in os.listdir(patches) if re.fullmatch(r"core_v\d+\.\d+\.\d+", d))
    fits = [d for d in sets if _version(d)[:2] == (major, minor) and _version(d)[2] <= patch]
    if not fits:
        raise ValueError(f"no patch set for Megatron-LM core_v{major}.{minor}.{patch} "
                         f"({checkout}); sets in {patches}: {', '.join(sets) or 'none'}")
    return os.path.join(patches, max(fits, key=_version))


if __name__ == "__main__":
    try:
        print(patch_set(sys.argv[1]))
    except (ValueError, OSError) as e:
        sys.exit(f"patch_set: {e}")
