"""Request bodies the HTTP endpoint accepts, validated before any model is touched.

Fields follow OpenAI's API plus LM Studio's extensions (`ttl`, `ignore_eos`); unknown fields are ignored, as
OpenAI-compatible servers do. Every rule here answers 400 with the offending field named in `param`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

MAX_TTL = 365 * 86400  # seconds; a larger ttl is a mistake, not a plan
ROLES = ("system", "user", "assistant", "tool", "developer")

# NaN and Infinity are never a setting, and neither is `true` or "0.5" (as OpenAI: a number is a JSON number)
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
MAX_MODEL_NAME = 512  # characters; keys and relative paths are far shorter, and matching a name costs its length
MAX_LOGIT_BIAS = 1024  # entries; each is applied to every sampled token
_TOKEN_ID = re.compile(r"-?[0-9]{1,11}")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    ttl: StrictInt | None = Field(default=None, ge=1, le=MAX_TTL)

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return v.strip()


class _Sampling(_Request):
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=5)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=0)
    min_p: Number | None = Field(default=None, ge=0, le=1)
    typical_p: Number | None = Field(default=None, ge=0, le=1)  # locally typical sampling; 1 (the default) is off
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"maxItems": 16})
    seed: StrictInt | None = Field(default=None, ge=-1, le=2**32 - 1)  # -1: random, as LM Studio takes it
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: Number | None = Field(default=None, ge=0, le=10)
    logit_bias: dict[str, Number] | None = Field(default=None, json_schema_extra={
        "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": f"^{_TOKEN_ID.pattern}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = Field(default=1, json_schema_extra={"minimum": 1, "maximum": 1})
    ignore_eos: StrictBool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported: send several requests for several choices")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries, got {len(v)}")
        for key, value in (v or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys are token ids; '{key[:20]}' is not")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values are from -100 to 100, got {value}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling_params(self) -> dict[str, Any]:
        """What the worker passes to llama-cpp-python (only fields the client set)."""
        names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "stop", "seed",
                 "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias", "ignore_eos")
        # `is`, not `in`: 0 == False, and temperature 0 (greedy) was dropped as if it had not been sent
        params = {k: v for k in names if (v := getattr(self, k)) is not None and v is not False}
        if params.get("seed") == -1:
            del params["seed"]
        return params


MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_REPEAT = 256  # maxItems, maxLength ...: llama.cpp's grammar builder writes one rule per repetition
_COUNTS = ("maxItems", "minItems", "maxLength", "minLength", "maxProperties", "minProperties", "maxContains",
           "minContains")


MAX_PATTERN = 1000  # characters of a `pattern` regex
MAX_PATTERN_COST = 1024  # grammar copies a pattern may expand to
_SPECIAL = set("()[]{}|*+?.\\^$")


class _Pattern:
    """A recursive-descent check of a `pattern` against the regex subset llama-cpp-python's converter turns into
    a grammar safely. Outside it the converter loops forever (a stray `]`), llama.cpp's sampler crashes
    (`(|a)*`), or a repetition nested in a repetition makes one sampling step take minutes: all refused.
    `cost` is how many copies of its atoms the grammar gets (`x{m,n}` is n copies)."""

    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0

    def fail(self, why: str) -> ValueError:
        return ValueError(f"'pattern: {self.text[:60]}' in the JSON schema: {why} at position {self.i}; supported "
                          "are literals, escapes, [classes], (groups) with |, and * + ? {m,n} on what holds no "
                          "repetition itself")

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def parse(self) -> int:
        self.i = 1  # after the ^
        cost, _ = self.alternation()
        if self.text[self.i:] == "$":
            self.i += 1
        if self.i != len(self.text):
            raise self.fail(f"unexpected '{self.peek()}'")
        return cost

    def alternation(self) -> tuple[int, bool]:
        cost, repeats = self.sequence()
        while self.peek() == "|":
            self.i += 1
            more, more_repeats = self.sequence()
            cost, repeats = cost + more, repeats or more_repeats
        return cost, repeats

    def sequence(self) -> tuple[int, bool]:
        cost, repeats = 0, False
        while self.peek() and self.peek() not in "|)$":
            atom, inner = self.atom()
            times = self.quantifier()
            if times is not None:
                if inner:
                    raise self.fail("a repetition of something that repeats itself")
                atom, inner = atom * max(times, 1), True
            cost, repeats = cost + atom, repeats or inner
            if cost > MAX_PATTERN_COST:
                raise self.fail(f"it expands to more than {MAX_PATTERN_COST} copies")
        if cost == 0:
            raise self.fail("an empty alternative")
        return cost, repeats

    def atom(self) -> tuple[int, bool]:
        c = self.peek()
        if c == "\\":
            if self.i + 1 >= len(self.text):
                raise self.fail("a backslash at the end")
            self.i += 2
        elif c == "[":
            self.i += 1
            if self.peek() == "^":
                self.i += 1
            if self.peek() == "]":
                raise self.fail("an empty [] (write a ] inside a class as \\])")
            while self.peek() != "]":
                if not self.peek():
                    raise self.fail("an unclosed [")
                self.i += 2 if self.peek() == "\\" else 1
            self.i += 1
        elif c == "(":
            self.i += 1
            if self.peek() == "?":
                raise self.fail("(?...) groups are not supported")
            cost, repeats = self.alternation()
            if self.peek() != ")":
                raise self.fail("an unclosed (")
            self.i += 1
            return cost, repeats
        elif c in _SPECIAL and c != ".":
            raise self.fail(f"'{c}' where a character is expected (escape it as \\{c})")
        else:
            self.i += 1
        return 1, False

    def quantifier(self) -> int | None:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return 1
        if c != "{":
            return None
        end = self.text.find("}", self.i)
        body = self.text[self.i + 1:end] if end > 0 else ""
        low, _, high = body.partition(",")
        if end < 0 or not low.isascii() or not low.isdigit() or (high and not (high.isascii() and high.isdigit())):
            raise self.fail("a {m,n} count that is not plain digits")
        self.i = end + 1
        return max(int(low), int(high or 0))


def check_pattern(pattern: str) -> None:
    """Raises ValueError for a regex `pattern` outside what can safely become grammar rules (see _Pattern)."""
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"a 'pattern' in the JSON schema is longer than {MAX_PATTERN} characters")
    if not (pattern.startswith("^") and pattern.endswith("$")) or pattern.endswith("\\$"):
        raise ValueError(f"'pattern: {pattern[:60]}' in the JSON schema must start with ^ and end with $ (llama.cpp "
                         "turns only anchored patterns into a grammar)")
    if pattern != "^$":
        _Pattern(pattern).parse()


def check_schema(schema: Any, depth: int = 0) -> None:
    """Raises ValueError for a JSON schema that would cost the worker unbounded memory or time to turn into a
    grammar (huge repetition counts in keywords or regex patterns, deep nesting) or that points outside itself
    (a remote `$ref`)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in _COUNTS and isinstance(value, int | float) and not 0 <= value <= MAX_REPEAT:
                raise ValueError(f"'{key}: {value}' in the JSON schema: at most {MAX_REPEAT} is supported")
            if key == "$ref" and (not isinstance(value, str) or not value.startswith("#")):
                raise ValueError("only local references ('#/...') are supported in the JSON schema")
            if key == "pattern" and isinstance(value, str):
                check_pattern(value)
            check_schema(value, depth + 1)
    elif isinstance(schema, list):
        for item in schema:
            check_schema(item, depth + 1)


def _sized(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON schema of at most MAX_SCHEMA_BYTES."""
    if schema is not None and len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES // 1024} KB")
    return schema


def _bounded_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON schema a grammar can be built from: at most MAX_SCHEMA_BYTES, bounded (check_schema)."""
    if _sized(schema) is not None:
        check_schema(schema)
    return schema


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _bounded(self) -> ResponseFormat:
        for part in (self.json_schema, self.schema_):
            _bounded_schema(part)
        return self


MAX_TOOLS = 128  # functions one request offers; each is rendered into the prompt
FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"  # OpenAI's rule for function names


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(default=None, max_length=64 * 1024)
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError(f"must be a JSON schema of type 'object' (a call's arguments are an object), "
                             f"not of type {v['type']!r}")
        overriding = sorted(k for k in ("anyOf", "oneOf", "allOf", "$ref", "enum", "const", "not") if k in (v or {}))
        if overriding:
            raise ValueError(f"must be an object schema at its top: {', '.join(overriding)} there could make the "
                             "arguments something else (put them inside `properties`)")
        # Only its size here: the model reads the schema, nothing is built from it. A forced call's schemas become a
        # grammar and have its bounds too (ChatRequest._tool_choice); an agent's tools (MCP servers' patterns, long
        # strings, big counts) are fine as long as nothing forces a call of them.
        return _sized(v)


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = Field(json_schema_extra={"enum": ["function"]})
    function: FunctionDef | None = None

    @model_validator(mode="after")
    def _function(self) -> Tool:
        if self.type != "function":
            raise ValueError(f"tools of type '{self.type}' are not supported; only 'function' tools are")
        if self.function is None:
            raise ValueError("a function tool needs `function`")
        return self


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(default="{}", max_length=1024 * 1024)


class ToolCallIn(BaseModel):
    """A call an assistant message made (the history a client sends back with the results)."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: dict[str, str]

    @property
    def name(self) -> str:
        return self.function.get("name", "")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(json_schema_extra={"enum": list(ROLES)})
    content: str | list[dict[str, Any]] | None = Field(default=None, json_schema_extra={"items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}})
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        for part in v if isinstance(v, list) else []:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content parts of type '{part.get('type')}' are not supported; send text")
        return v

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role '{v}'; use one of {', '.join(ROLES)}")
        return v

    def as_llama(self) -> dict[str, Any]:
        """The message as chat templates take it (Hugging Face's convention): tool calls with their arguments as
        objects, a tool result with its call's id and the function's name when the client gave it."""
        content = self.content
        if isinstance(content, list):  # OpenAI content parts, already checked to be text
            content = "\n".join(part["text"] for part in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id or f"call_{n}", "type": "function",
                                      "function": {"name": c.function.name, "arguments": _arguments(c.function)}}
                                     for n, c in enumerate(self.tool_calls)]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id or ""
            if self.name:
                message["name"] = self.name
        return message


def _arguments(function: CalledFunction) -> Any:
    """A call's arguments as an object, as templates render them (`| tojson`); text that is not JSON stays text."""
    try:
        return json.loads(function.arguments)
    except (ValueError, RecursionError):
        return function.arguments


class ChatRequest(_Sampling):
    # Set by /v1/messages and /v1/responses: a max_tokens beyond the context means "what the context leaves".
    cap_max_tokens: ClassVar[bool] = False

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> ChatRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @model_validator(mode="after")
    def _tool_choice(self) -> ChatRequest:
        choice = self.tool_choice
        if choice is None or choice == "none" or choice == "auto":
            return self
        if not self.tools:
            raise ValueError("tool_choice other than 'none' or 'auto' needs `tools`")
        if isinstance(choice, NamedToolChoice) and choice.name not in {f.name for f in self.functions}:
            raise ValueError(f"tool_choice names the function '{choice.name}', which is not in `tools`")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError("a forced tool_choice and response_format cannot be combined: both constrain the answer")
        _bounded_schema(self._call_schema())  # the functions together, as the grammar gets them
        return self

    def _call_schema(self) -> dict[str, Any]:
        from lmsd.tools import call_schema

        return call_schema([f.model_dump(exclude_none=True) for f in self.forced],
                           parallel=bool(self.parallel_tool_calls))

    @property
    def functions(self) -> list[FunctionDef]:
        """The functions the model may call: none with tool_choice "none"."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.function for t in self.tools if t.function is not None]

    @property
    def forced(self) -> list[FunctionDef]:
        """The functions an answer must call one of (tool_choice "required" or a named one), else []."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [f for f in self.functions if f.name == choice.name]
        return self.functions if choice == "required" else []

    def worker_params(self) -> dict[str, Any]:
        params = self.sampling_params()
        params["messages"] = [m.as_llama() for m in self.messages]
        if self.response_format is not None and self.response_format.type != "text":
            params["response_format"] = self.response_format.model_dump(by_alias=True, exclude_none=True)
        if self.functions:
            params["tools"] = [{"type": "function", "function": f.model_dump(exclude_none=True)}
                               for f in self.functions]
        if self.forced:
            params["response_format"] = {"type": "json_schema", "json_schema": {"schema": self._call_schema()}}
            params["forced_call"] = True
        return params


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(json_schema_extra={"minLength": 1, "minItems": 1, "maxItems": 1,
                                                       "items": {"type": "string", "minLength": 1}})
    response_format: ResponseFormat | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send exactly one prompt (a list of several is not supported)")
        if not (v if isinstance(v, str) else v[0]):
            raise ValueError("prompt must not be empty")
        return v

    def worker_params(self) -> dict[str, Any]:
        params = self.sampling_params()
        params["prompt"] = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        if self.response_format is not None and self.response_format.type != "text":
            params["response_format"] = self.response_format.model_dump(by_alias=True, exclude_none=True)
        return params


class EmbeddingRequest(_Request):
    input: str | list[str] = Field(json_schema_extra={"minLength": 1, "minItems": 1, "maxItems": 2048,
                                                      "items": {"type": "string", "minLength": 1}})
    encoding_format: Literal["float", "base64"] | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        if isinstance(v, list) and len(v) > 2048:
            raise ValueError("at most 2048 inputs per request")
        if any(not text for text in ([v] if isinstance(v, str) else v)):
            raise ValueError("input must not contain empty strings (there is nothing to embed)")
        return v

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class AgentChatRequest(ChatRequest):
    """A chat request made from a /v1/messages or /v1/responses body (their clients send large max_tokens)."""

    cap_max_tokens: ClassVar[bool] = True
