"""Takes two redundant costs out of the Triton interpreter for the interpreter child suites.

1. Every call of a ``@triton.jit`` helper from inside a kernel re-patches triton.language for the
interpreter (``_patch_lang``: ``inspect.getmembers`` over tl, tl.tensor and tl.math), although
the kernel's launch already patched the same modules and restores them only when its grid ends.
A profile of test_triton_kernel.py's projection tests put 23 s of 64 s there (triton 3.9,
2026-11-28). Skipping the re-patch while the launch's patch is in force changes no kernel
semantics: the nested call would only re-record attributes that already hold the patched values.

2. Every integer add, sub and mul runs triton's overflow sanitizer (casts to int64, the op again,
two compares) and hands the result to ``device_assert``, which drops it unless the kernel runs
with ``debug=True``. The same profile put 20 s there. The sanitizer now returns at once when
``device_assert`` would drop its check.

Where triton's internals differ from what this expects, nothing is changed.
"""
from __future__ import annotations

import inspect

_MARK = "_dhp_fx_skips_nested_repatch"


def _lang_is_patched(lang, is_builtin) -> bool:
    # The launch replaces every builtin of the module by an interpreter wrapper, program_id included.
    member = getattr(lang, "program_id", None)
    return member is not None and not is_builtin(member)


def skip_nested_lang_patches() -> bool:
    """Installs the skip; True where it is in force."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    is_builtin = getattr(tl.core, "is_builtin", None)
    if not (callable(original) and callable(scope_type) and callable(is_builtin)):
        return False
    if getattr(original, _MARK, False):
        return True
    if not is_builtin(getattr(tl, "program_id", None)):
        return False  # the module is patched right now, or builtins are marked differently: leave it

    langs_of = {}

    def patch_lang(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if langs and all(_lang_is_patched(lang, is_builtin) for lang in langs):
            return scope_type()  # nothing to restore: the launch that patched them restores them
        return original(fn)

    setattr(patch_lang, _MARK, True)
    interpreter._patch_lang = patch_lang
    return True


def skip_dropped_overflow_checks() -> bool:
    """Installs the early return; True where it is in force."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    semantic = getattr(interpreter, "interpreter_semantic", None)
    sanitize = getattr(type(semantic), "binary_op_sanitize_overflow_impl", None)
    device_assert = getattr(type(semantic), "device_assert", None)
    if sanitize is None or device_assert is None:
        return False
    if "_dhp_fx_fast" in vars(semantic):
        return True
    try:
        drops_unless_debug = "if not self.builder.options.debug:\n            return" in inspect.getsource(device_assert)
    except (OSError, TypeError):
        return False
    if not drops_unless_debug:
        return False  # this triton checks overflow without debug: keep its sanitizer

    def binary_op_sanitize_overflow_impl(lhs, rhs, binary_op):
        if semantic.builder.options.debug:
            return sanitize(semantic, lhs, rhs, binary_op)
        return None

    semantic.binary_op_sanitize_overflow_impl = binary_op_sanitize_overflow_impl
    semantic._dhp_fx_fast = True
    return True
