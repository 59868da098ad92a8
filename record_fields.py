"""The values of a published record, made plain and safe for layouts.py's converters: text, final
answers, chat prompts, time and memory limits, code tests, and LiveCodeBench's pickled private
tests, read without running code. Anything else raises Skip, whose message is the reason counted."""

import base64
import io
import json
import pickle
import re
import zlib

MAX_TIME_LIMIT = 60  # seconds per test, the most tasks.check_example accepts
# a compressed test file may expand this far, no further (a zip bomb stops here)
MAX_UNPICKLED_BYTES = 2**28


class Skip(Exception):
    """A record that is read but cannot be scored; its message is the reason counted."""



# ----------------------------------------------------------------------------- values

def text(value) -> str:
    if isinstance(value, str):
        return value
    raise Skip("a text field that is not text")


def answer_text(value) -> str:
    """A final answer as a string: "42", 42 and 42.0 all give "42" (AIME's answers come all three
    ways)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    if not (isinstance(value, str) and value.strip()):
        raise Skip("no answer")
    return value.strip()


def plain(value):
    """`value` if it is JSON-like data (None, bool, int, float, str, lists and dicts of them), else
    Skip."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise Skip("a test value that is not plain data")


def json_field(value):
    """A field that holds JSON, as a string (the usual) or already parsed (some parquet exports)."""
    return json.loads(value) if isinstance(value, str) else value


def chat_messages(value) -> list[dict]:
    if not (isinstance(value, list) and value
            and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in value)):
        raise Skip("a prompt that is neither text nor chat messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_fields(value) -> dict:
    """{"prompt": text} for a text prompt; for chat messages also {"messages": ...}, rendered by the
    model's chat template (models.encode_prompt), and a plain "prompt" (the contents joined) for the
    held-out hash and logs."""
    if isinstance(value, str):
        return {"prompt": value}
    messages = chat_messages(value)
    return {"prompt": "\n\n".join(m["content"] for m in messages), "messages": messages}


def limits(record: dict) -> dict:
    """"time_limit" in seconds (2, 2.5, "2 seconds", "1000 ms"; at most MAX_TIME_LIMIT) and
    "memory_limit_mb" (256, "256 megabytes"; recorded: the sandbox enforces its own MEMORY_MB),
    where the record gives them."""
    found, time, memory = {}, record.get("time_limit"), record.get("memory_limit")
    if (isinstance(time, str)
            and (number := re.match(r"\s*(\d+(?:\.\d+)?)\s*(ms|millisecond)?", time))):
        time = float(number[1]) / (1000 if number[2] else 1)
    if isinstance(time, (int, float)) and not isinstance(time, bool) and 0 < time < float("inf"):
        found["time_limit"] = min(float(time), MAX_TIME_LIMIT)
    if isinstance(memory, str) and (number := re.match(r"\s*(\d+)", memory)):
        memory = int(number[1])
    if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
        found["memory_limit_mb"] = memory
    return found


# ----------------------------------------------------------------------------- code tests

def code_tests(spec: dict, in_class: bool = False) -> dict:
    """{"tests", "entry_point"?} from APPS/TACO/verl's {"inputs", "outputs"[, "fn_name"]}.

    Call-based tests (fn_name) become {"call": "f(1, [2])", "output": "3"}: each argument the repr
    of a JSON value, so the call is a literal expression, evaluated only in the sandbox. APPS wraps
    a return value in a one-element list ([3] for 3), as its own checker unwraps it, so do we.
    LeetCode-style problems define the function in `class Solution`, so their calls are
    Solution().f(...).
    """
    inputs, outputs, name = spec["inputs"], spec["outputs"], spec.get("fn_name")
    if not (isinstance(inputs, list) and isinstance(outputs, list) and inputs
            and len(inputs) == len(outputs)):
        raise Skip("no tests")
    if name is None:
        return {"tests": [{"input": stdin_text(i), "output": stdin_text(o)}
                          for i, o in zip(inputs, outputs)]}
    if not (isinstance(name, str) and name.isidentifier()):
        raise Skip("a function name that is not a Python name")
    callee = f"Solution().{name}" if in_class else name
    tests = []
    for args, value in zip(inputs, outputs):
        if not isinstance(args, list):
            raise Skip("call arguments that are not a list")
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        tests.append({"call": f"{callee}({', '.join(repr(plain(a)) for a in args)})",
                      "output": repr(plain(value))})
    return {"tests": tests, "entry_point": name}


def stdin_text(value) -> str:
    """Test input/output as text; a list of lines (some APPS outputs) is joined."""
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(value) + "\n"
    return text(value)


class PlainUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, tuples, strings, bytes and numbers (they need no import) and refuses
    anything that names a class or function: that is how a pickle runs code (__reduce__ ->
    os.system)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def private_tests(value) -> list:
    """LiveCodeBench's private tests: a JSON list, or base64(zlib(pickle(JSON text))), read without
    running code."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        return json.loads(value)
    inflater = zlib.decompressobj()
    raw = inflater.decompress(base64.b64decode(value), MAX_UNPICKLED_BYTES)
    if inflater.unconsumed_tail:
        raise pickle.UnpicklingError("larger than MAX_UNPICKLED_BYTES")
    loaded = PlainUnpickler(io.BytesIO(raw)).load()
    return json.loads(loaded) if isinstance(loaded, (str, bytes)) else loaded
