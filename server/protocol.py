"""From OpenAI request bodies to engine inputs, and from engine outputs to OpenAI response bodies."""
from __future__ import annotations

from dataclasses import dataclass

from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

from .errors import APIError, bad_request, from_value_error
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass(frozen=True)
class Limits:
    """Per-request limits of this server (the operator's, on top of the API's own bounds)."""

    max_tokens: int = 4096
    max_n: int = 16
    max_stop: int = 16
    max_stop_len: int = 256
    max_logit_bias: int = 1024


def _check_limits(req: SamplingFields, max_tokens: int, limits: Limits) -> None:
    if max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens: {max_tokens} exceeds this server's limit of {limits.max_tokens}", "max_tokens")
    if req.n > limits.max_n:
        raise bad_request(f"n: {req.n} exceeds this server's limit of {limits.max_n}", "n")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > limits.max_stop:
        raise bad_request(f"stop: at most {limits.max_stop} stop sequences", "stop")
    if any(len(s) > limits.max_stop_len or not s for s in stops):
        raise bad_request(f"stop: each stop sequence must have 1 to {limits.max_stop_len} characters", "stop")
    if req.logit_bias and len(req.logit_bias) > limits.max_logit_bias:
        raise bad_request(f"logit_bias: at most {limits.max_logit_bias} entries", "logit_bias")
    if req.stop_token_ids and len(req.stop_token_ids) > limits.max_logit_bias:
        raise bad_request(f"stop_token_ids: at most {limits.max_logit_bias} entries", "stop_token_ids")


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, limits: Limits,
                    extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    _check_limits(req, max_tokens, limits)
    stop = tuple([req.stop] if isinstance(req.stop, str) else (req.stop or ())) + extra_stop
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()}, seed=req.seed,
            max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            stop=tuple(dict.fromkeys(stop)), stop_token_ids=tuple(req.stop_token_ids or ()), logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output)
    except ValueError as exc:
        raise from_value_error(exc) from None


def completion_params(req: CompletionRequest, limits: Limits) -> SamplingParams:
    if req.suffix:
        raise bad_request("suffix: not supported by this model", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of: only best_of == n is supported", "best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo: prompt logprobs (echo with logprobs) are not supported", "echo")
    return sampling_params(req, req.max_tokens or 16, req.logprobs, limits)


def chat_params(req: ChatCompletionRequest, limits: Limits, max_model_len: int, prompt_len: int,
                template_stop: tuple[str, ...]) -> SamplingParams:
    if req.tools:
        raise bad_request("tools: tool calling is not supported by this model", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("response_format: only {'type': 'text'} is supported", "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs: requires logprobs=true", "top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:  # OpenAI's default: as much as the context allows
        max_tokens = max(1, min(limits.max_tokens, max_model_len - prompt_len))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return sampling_params(req, max_tokens, logprobs, limits, extra_stop=template_stop)


def check_text(text: str, param: str) -> str:
    """Text must be encodable Unicode: JSON can carry lone surrogates ("\\ud800") that no tokenizer
    takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param}: not valid Unicode (lone surrogate at character {exc.start})", param) from None
    return text


def prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [check_text(prompt, "prompt")]
    if not prompt:
        raise bad_request("prompt: must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if len(prompt) > 64:
        raise bad_request("prompt: at most 64 prompts per request", "prompt")
    return [check_text(p, "prompt") if isinstance(p, str) else list(p) for p in prompt]


def usage_dict(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


AS_IDS = object()  # pass as the tokenizer to name tokens by id


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    if tokenizer is None or tokenizer is AS_IDS:
        return f"token_id:{token_id}"
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def completion_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob], text_offset: int = 0) -> dict:
    """The legacy completions `logprobs` object."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        alternatives: dict[str, float] = {}
        for t, v in lp.top:  # best first: where two tokens share a text, the likelier one stays
            alternatives.setdefault(token_text(tokenizer, t), v)
        top.append(alternatives or None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        raw = (tokenizer.token_bytes(token_id) if tokenizer not in (None, AS_IDS)
               else token_text(None, token_id).encode())
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def finish_reason(out: CompletionOutput) -> str | None:
    """OpenAI knows 'stop' and 'length' (and tool/content-filter ones); an abort reads as 'stop'."""
    if out.finish_reason in (None, "stop", "length"):
        return out.finish_reason
    if out.finish_reason == "error":
        raise APIError(500, "the model step failed for this request; it was not retried", "internal_server_error")
    return "stop"
