"""The models a server offers, as plain functions of Triton's requests (no pytriton import here).

Triton's dynamic batcher hands each model a list of requests that arrived together. Each request
is checked on its own (a bad one gets its own `error` output, the others run), then the runnable
ones are split into ONNX Runtime batches the IA3 way:

- a bank export runs every greedy request in ONE batch, each row with its own adapter;
- a swappable, foldswap or merged export runs one batch per adapter (it binds one vector set);
- a sampled request runs alone (its seed drives its own random stream, as it would alone), as does
  one with logits processors (penalties, logit_bias, min_new_tokens) or ignore_eos.

Prompts of different lengths share a batch: decoders are left-padded, encoders right-padded,
both with an attention mask, so every answer equals the same request run alone. A batch that
fails anyway is run again row by row, so one bad request cannot fail the others.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import threading

import numpy as np

from ..errors import IA3Error
from ..formats.jsonfile import dumps
from ..runtime import GenerationOptions, IA3Session, generate_ids
from ..runtime.generation import check_prompt_length
from ..runtime.requests import NUMERIC_FIELDS, register
from ..tasks import EXPORT_TASKS, task_named
from .adapters import MAX_ADAPTERS, AdapterPool

BYTES = np.bytes_
# generate's request parameters (not tensors): stop strings; alternatives' log-probabilities per new token
# and per prompt token (generate_stream only); a client's id to cancel its request by
STOP, LOGPROBS, PROMPT_LOGPROBS, REQUEST_ID = "stop", "logprobs", "prompt_logprobs", "request_id"
BAD_PARAMETERS = "ia3_bad_parameters"  # the mended stub's note: the request's parameters could not be read (stub.py)


@dataclasses.dataclass(frozen=True)
class Port:
    """One input or output tensor of a served model (shape without the batch dimension)."""

    name: str
    dtype: type
    shape: tuple = (1,)
    optional: bool = False


PROMPT_INPUTS = (
    Port("text", BYTES, optional=True),
    Port("input_ids", np.int64, (-1,), optional=True),  # negative entries are padding (bucketing)
    Port("adapter", BYTES),  # empty: the base model. Required: Triton batches only requests with the same inputs
)
STATUS_OUTPUTS = (Port("error", BYTES), Port("batch_size", np.int32))


class Stats:
    """Counters a test or an operator reads through the `adapters` model (action "stats")."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.triton_batches: collections.Counter = collections.Counter()  # requests per Triton batch -> count
        self.runtime_batches: collections.Counter = collections.Counter()  # rows per ONNX Runtime batch -> count
        self.mixed_batches = 0  # ONNX Runtime batches whose rows used more than one adapter

    def record(self, requests: int, errors: int, batches: list[list]) -> None:
        with self._lock:
            self.requests += requests
            self.errors += errors
            self.triton_batches[requests] += 1
            for rows in batches:
                self.runtime_batches[len(rows)] += 1
                self.mixed_batches += len({r.adapter for r in rows}) > 1

    def as_dict(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "errors": self.errors,
                    "triton_batches": dict(sorted(self.triton_batches.items())),
                    "runtime_batches": dict(sorted(self.runtime_batches.items())),
                    "mixed_adapter_batches": self.mixed_batches}


@dataclasses.dataclass
class Row:
    """One checked request: its prompt ids, adapter and options, later its answer or its error."""

    ids: list[int] = dataclasses.field(default_factory=list)
    adapter: str | None = None
    options: GenerationOptions | None = None
    logprobs: int | None = None  # generate_stream: alternatives per token to report the log-probabilities of
    prompt_logprobs: int | None = None  # generate_stream: the same per prompt token
    key: str | None = None  # on the engine: what pytriton's mended stub reports a disconnect with (stub.py)
    error: str = ""
    answer: object = None
    batch_size: int = 0


class Served:
    """What every served model shares: the session, its adapter pool, tokenizer, limits and stats."""

    def __init__(self, session, max_tokens: int | None = None, max_adapters: int = MAX_ADAPTERS):
        self.session, self.pool = session, AdapterPool(session, max_adapters)
        self.stats = Stats()
        self.streams = None  # the engine's requests (serve.streaming.Streams) under continuous batching
        self.config = session.folder.config
        self.max_tokens = max_tokens or session.folder.max_positions
        self.vocab_size = self.config.get("vocab_size")
        try:
            self.tokenizer = session.tokenizer()
            self._no_tokenizer = ""
        except IA3Error as e:  # token ids still work
            self.tokenizer, self._no_tokenizer = None, str(e)

    def parse_prompt(self, row: Row, request, reserve: int = 0) -> None:
        """Prompt ids (from `text` or `input_ids`) and adapter; `reserve` tokens must fit after the prompt."""
        has_text, has_ids = "text" in request, "input_ids" in request
        if has_text == has_ids:
            raise IA3Error("give exactly one of the inputs `text` and `input_ids`")
        if has_text:
            if self.tokenizer is None:
                raise IA3Error(f"{self._no_tokenizer}; send `input_ids`")
            row.ids = self.tokenizer.encode(_raw(request, "text"))  # checked as UTF-8 within the byte limit first
            count = len(row.ids)
        else:  # counted before any copy: a list of 10 million ids once raised the peak by 460 MB before the limit
            given = np.asarray(request["input_ids"]).reshape(-1)
            count = int(np.count_nonzero(given >= 0))  # the batch's padding (-1) left out
        if not count:
            raise IA3Error("the prompt is empty; send at least one token")
        if self.session.folder.max_positions is None:  # a model without positions (T5): bounded all the same
            check_prompt_length(count, self.session.limits)  # here, per row, as generate_ids would for the batch
        if self.max_tokens and count + reserve > self.max_tokens:
            asked = f" and {reserve} new tokens were asked" if reserve else ""
            raise IA3Error(f"the prompt has {count} tokens{asked}"
                           + f", over this model's limit of {self.max_tokens}; shorten the prompt"
                           + (" or ask for fewer tokens" if reserve else ""))
        if has_ids:
            ids = given[given >= 0]
            if self.vocab_size and ids.max() >= self.vocab_size:
                raise IA3Error(f"input_ids holds {ids.max()}, outside the vocabulary of {self.vocab_size} tokens")
            row.ids = ids.tolist()
        row.adapter = _string(request, "adapter") or None

    def groups(self, rows: list[Row], alone=lambda row: False) -> list[list[Row]]:
        """ONNX Runtime batches: all rows together on a bank export, else one batch per adapter;
        rows for which `alone` holds run by themselves."""
        together: dict = {}
        for row in rows:
            if not alone(row):
                together.setdefault(None if self.session.binding.mixes_adapters else row.adapter, []).append(row)
        return [*together.values(), *([row] for row in rows if alone(row))]


class ServedModel:
    """One Triton model: check each request, run the runnable ones in planned batches, answer every
    one. Subclasses say how to read a request, batch rows, run a batch and write an answer."""

    name: str
    inputs: tuple
    outputs: tuple

    def __init__(self, served: Served):
        self.served = served

    def __call__(self, requests) -> list[dict]:
        rows = []
        required = [p.name for p in self.inputs if not p.optional]
        for request in requests:
            row = Row()
            try:
                missing = [name for name in required if name not in request]
                if missing:  # Triton lets a request without a required input through
                    raise IA3Error(f"missing input `{missing[0]}`; every request sends {', '.join(required)}")
                self.parse(row, request)
                self.served.pool.acquire(row.adapter)
            except IA3Error as e:
                row.error, row.adapter = _one_line(e), None
            rows.append(row)
        ready = [r for r in rows if not r.error]
        batches = self.plan(ready)
        try:
            for batch in batches:
                self._run(batch)
        finally:
            for row in ready:
                self.served.pool.release(row.adapter)
        self.served.stats.record(len(rows), sum(bool(r.error) for r in rows), batches)
        return [{**self.respond(r), "error": _bytes(r.error), "batch_size": np.array([[r.batch_size]], np.int32)}
                for r in rows]

    def _run(self, batch: list[Row]) -> None:
        try:
            answers = self.execute(batch)
        except IA3Error as e:
            if len(batch) == 1:
                batch[0].error = _one_line(e)
                return
            for row in batch:  # find the culprit: the others still get their answer
                self._run([row])
            return
        for row, answer in zip(batch, answers):
            row.answer, row.batch_size = answer, len(batch)

    def parse(self, row: Row, request) -> None:
        self.served.parse_prompt(row, request)

    def plan(self, rows: list[Row]) -> list[list[Row]]:
        return self.served.groups(rows)

    def execute(self, rows: list[Row]) -> list:
        raise NotImplementedError

    def respond(self, row: Row) -> dict:
        raise NotImplementedError


class Generate(ServedModel):
    """`generate`: text or token ids in, new text and token ids out (decoder and seq2seq exports)."""

    name = "generate"
    inputs = (*PROMPT_INPUTS, Port("max_new_tokens", np.int32), Port("do_sample", np.bool_, optional=True),
              Port("temperature", np.float32, optional=True), Port("top_p", np.float32, optional=True),
              Port("seed", np.int64, optional=True), *(Port(name, dtype, optional=True) for name, dtype in (
                  ("top_k", np.int32), ("min_p", np.float32), ("repetition_penalty", np.float32),
                  ("presence_penalty", np.float32), ("frequency_penalty", np.float32),
                  ("min_new_tokens", np.int32), ("ignore_eos", np.bool_), ("logit_bias", BYTES))))
    outputs = (Port("text", BYTES), Port("output_ids", np.int64, (-1,)), *STATUS_OUTPUTS)

    def __init__(self, served: Served, streamed: bool = False):
        super().__init__(served)
        self.streamed = streamed  # generate_stream's parser: its responses carry the `logprobs` asked for

    def parse(self, row: Row, request) -> None:
        parameters = request_parameters(request)
        for name in (LOGPROBS, PROMPT_LOGPROBS):
            if name in parameters and not self.streamed:  # never ignored: the client would not get what it asked
                raise IA3Error(f"parameter `{name}` is answered by generate_stream only (this model has no {name} "
                               "output); send the request there, or to the OpenAI API's /v1/completions")
        seed = _number(request, "seed", -1, int)
        defaults = GenerationOptions()  # an optional input left out: the option's default
        numbers = {name: _number(request, name, getattr(defaults, name), type(getattr(defaults, name)))
                   for name in (*NUMERIC_FIELDS, "do_sample", "ignore_eos") if name != "seed"}
        row.options = GenerationOptions(**numbers, seed=None if seed == -1 else seed,  # -1: unseeded; below: refused
                                        stop_strings=_stop_strings(parameters.get(STOP)),
                                        logit_bias=_logit_bias(request))
        if row.options.stop_strings and self.served.tokenizer is None:
            raise IA3Error("parameter `stop` needs the export's tokenizer to read the text, and this folder has none; "
                           "end the request with max_new_tokens")
        self.served.parse_prompt(row, request, reserve=row.options.max_new_tokens)

    def plan(self, rows: list[Row]) -> list[list[Row]]:
        """Rows that sample, process logits, stop at strings or ignore EOS run alone: a batch shares one
        GenerationOptions."""
        alone = lambda row: (row.options.do_sample or row.options.stop_strings or row.options.processors  # noqa: E731
                             or row.options.ignore_eos)
        return [fitted for group in self.served.groups(rows, alone=alone) for fitted in self._fit(group)]

    def _fit(self, rows: list[Row]) -> list[list[Row]]:
        """Split a batch whose longest prompt plus largest max_new_tokens would pass the model's positions
        (generation budgets the batch as a whole and would cut every row); each row fits on its own."""
        limit, batches = self.served.max_tokens, [[]]
        for row in rows:
            batch = batches[-1] + [row]
            if limit and batches[-1] and max(len(r.ids) for r in batch) + max(r.options.max_new_tokens for r in batch) > limit:
                batches.append([row])
            else:
                batches[-1] = batch
        return [b for b in batches if b]

    def execute(self, rows: list[Row]) -> list[list[int]]:
        """One generate_ids call; greedy rows run to the longest max_new_tokens and are cut to their own."""
        options = dataclasses.replace(rows[0].options, max_new_tokens=max(r.options.max_new_tokens for r in rows))
        decode = self.served.tokenizer.decode if options.stop_strings else None
        outs = generate_ids(self.served.session, [r.ids for r in rows], [r.adapter for r in rows], options, decode)
        return [ids[:r.options.max_new_tokens] for ids, r in zip(outs, rows)]

    def respond(self, row: Row) -> dict:
        if row.answer is None:  # an error: no tokens (pytriton cannot send empty arrays)
            return {"text": _bytes("")}
        tokenizer = self.served.tokenizer
        text = tokenizer.decode(row.answer) if tokenizer is not None else ""
        return {"text": _bytes(text), "output_ids": np.array([row.answer], dtype=np.int64)}


class Classify(ServedModel):
    """`classify`: one forward pass of a text-classification export; logits and the top label out."""

    name = "classify"
    inputs = PROMPT_INPUTS
    outputs = (Port("logits", np.float32, (-1,)), Port("label", BYTES), *STATUS_OUTPUTS)

    def __init__(self, served: Served):
        super().__init__(served)
        graph = served.session.graphs["model"]
        self._token_types = "token_type_ids" in graph.inputs
        self._labels = served.config.get("id2label") or {}
        self._pad = served.session.folder.pad_id()

    def execute(self, rows: list[Row]) -> list[np.ndarray]:
        width = max(len(r.ids) for r in rows)
        ids = np.full((len(rows), width), self._pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row.ids)], mask[i, :len(row.ids)] = row.ids, 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._token_types:
            feeds["token_type_ids"] = np.zeros_like(ids)
        logits = self.served.session.run(feeds, graph="model", adapters=[r.adapter for r in rows], outputs=["logits"])
        return list(logits["logits"].astype(np.float32))

    def respond(self, row: Row) -> dict:
        if row.answer is None:  # an error: no logits (pytriton cannot send empty arrays)
            return {"label": _bytes("")}
        top = str(int(row.answer.argmax()))
        return {"logits": row.answer.reshape(1, -1), "label": _bytes(self._labels.get(top, top))}


class Adapters:
    """`adapters`: list, add ("load") and remove ("unload") adapters while serving; "stats" for counters.
    Paths are read on the server, so keep this model behind the same access rules as the folder."""

    name = "adapters"
    inputs = (Port("action", BYTES), Port("name", BYTES, optional=True), Port("source", BYTES, optional=True))
    outputs = (Port("result", BYTES), Port("error", BYTES))
    ACTIONS = ("list", "load", "unload", "stats")

    def __init__(self, served: Served, model_name: str):
        self.served, self.model_name = served, model_name

    def __call__(self, requests) -> list[dict]:
        answers = []
        for request in requests:
            try:
                result, error = self._act(request), ""
            except IA3Error as e:
                result, error = None, _one_line(e)
            answers.append({"result": _bytes(dumps(result)), "error": _bytes(error)})
        return answers

    def _act(self, request) -> object:
        pool = self.served.pool
        action = _string(request, "action")
        name = _string(request, "name") if "name" in request else ""
        source = _string(request, "source") if "source" in request else ""
        if action == "list":
            return {"adapters": pool.names(), "in_use": pool.in_use(), "mode": self.served.session.mode}
        if action == "load":
            if not source:
                raise IA3Error("action load needs `source`: a PEFT folder or .onnx_adapter file on the server, "
                               "or a name shipped in the exported folder")
            return {"loaded": pool.add(source, name or None)}
        if action == "unload":
            if not name:
                raise IA3Error("action unload needs `name`")
            return {name: pool.remove(name)}
        if action == "stats":
            engine = self.served.streams.stats() if self.served.streams is not None else None
            return {self.model_name: self.served.stats.as_dict(), **({"engine": engine} if engine else {})}
        raise IA3Error(f"unknown action {action!r}; use one of {', '.join(self.ACTIONS)}")


MODEL_FOR_FAMILY = {"causal-lm": Generate, "seq2seq-lm": Generate, "seq-cls": Classify}  # task families


def model_for(session) -> type:
    """The model class (`Generate` or `Classify`) that serves this export's task."""
    task = session.folder.task
    family = task_named(task).family if task in EXPORT_TASKS else None
    if family not in MODEL_FOR_FAMILY:
        raise IA3Error(f"{session.folder.path} is a {task or 'unknown'} export; `serve` runs causal-lm and seq2seq "
                       "exports (model `generate`) and text-classification exports (model `classify`)")
    return MODEL_FOR_FAMILY[family]


def _open(model_cls: type, answer: str):
    """A served model as a request path (runtime/requests.py): requests in Triton's form, handled as the
    server handles them, on one session for every request sent."""

    def open_path(folder: str, limits) -> callable:
        model = model_cls(Served(IA3Session(folder, limits=limits)))
        ports = {p.name: p for p in model.inputs}

        def send(text: str | bytes, **fields) -> str:
            request = {"text": np.array([[text.encode() if isinstance(text, str) else text]], dtype=object),
                       "adapter": _bytes("")}
            request.update({k: np.array([[v]], dtype=ports[k].dtype) for k, v in fields.items()})
            (out,) = model([request])
            error = out["error"][0][0].decode()
            if error:
                raise IA3Error(error)
            return out[answer][0][0].decode()

        send.close = model.served.session.close
        return send

    return open_path


register("serve generate", ("causal-lm", "seq2seq-lm"), NUMERIC_FIELDS)(
    _open(Generate, "text"))
register("serve classify", ("seq-cls",))(_open(Classify, "label"))


def _values(request, name: str) -> np.ndarray:
    values = np.asarray(request[name]).reshape(-1)
    if values.size != 1:
        raise IA3Error(f"input `{name}` must hold one value, got {values.size}")
    return values


def request_parameters(request) -> dict:
    """A Triton request's parameters; the mended stub's note that they could not be read is a one-line error."""
    parameters = getattr(request, "parameters", None) or {}
    if BAD_PARAMETERS in parameters:
        raise IA3Error(str(parameters[BAD_PARAMETERS]))
    return parameters


def _stop_strings(stop) -> list[str] | None:
    """The `stop` parameter: one string, or a JSON list of strings (Triton's parameters are scalars)."""
    if not stop:
        return None
    try:
        strings = json.loads(stop) if isinstance(stop, str) and stop.startswith("[") else [stop]
    except (ValueError, RecursionError):
        strings = None
    if not (isinstance(strings, list) and all(isinstance(s, str) and s for s in strings)):
        raise IA3Error("parameter `stop` must be a string or a JSON list of non-empty strings")
    return strings


def _logit_bias(request) -> dict | None:
    """The `logit_bias` input: OpenAI's JSON object of token id -> bias (GenerationOptions checks it)."""
    if "logit_bias" not in request:
        return None
    try:
        return json.loads(_string(request, "logit_bias"))
    except (ValueError, RecursionError):
        raise IA3Error("input `logit_bias` must be a JSON object of token ids to biases, such as "
                       "{\"50256\": -100}") from None


def _number(request, name: str, default, cast):
    if name not in request:
        return default
    try:
        return cast(_values(request, name)[0])
    except (TypeError, ValueError):
        raise IA3Error(f"input `{name}` is not a {cast.__name__}") from None


def _string(request, name: str) -> str:
    value = _raw(request, name)
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise IA3Error(f"input `{name}` is not UTF-8 text") from None


def _raw(request, name: str) -> str | bytes:
    """A BYTES input as Triton hands it over, not decoded yet (the tokenizer checks a prompt's size first)."""
    value = _values(request, name)[0]
    if not isinstance(value, (str, bytes, np.bytes_)):
        raise IA3Error(f"input `{name}` is not text; send it as BYTES (UTF-8)")
    return value


def _bytes(text: str) -> np.ndarray:
    return np.array([[text.encode("utf-8")]], dtype=object)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
