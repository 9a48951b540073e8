"""The offline generation API: a list of prompts in, a list of completions out.

`LLM(checkpoint).generate(prompts, SamplingParams(...))` runs every prompt through one
`LLMEngine` (continuous batching: all requests share the batch and the paged KV cache) until
each has finished, and returns the results in the order of the prompts. `LLM.chat(messages)`
does the same for conversations, in the model's own chat template and stopping at the end of the
assistant turn (vLLM's `LLM.chat`). Without SamplingParams, the model's generation_config.json
defaults apply. Used by scripts, evaluation and RL rollouts; interactive use (streaming,
aborting) talks to `LLMEngine` directly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

from inference.engine.llm_engine import LLMEngine
from inference.engine.sampling import SamplingParams
from inference.engine.speculative import LogprobEntry


@dataclass
class RequestOutput:
    """One finished completion."""

    request_id: str
    prompt: Optional[str]  # the prompt text (for LLM.chat: as rendered); None when given as token ids
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # the generated tokens (a final eos / stop token included)
    finish_reason: Optional[str]  # "stop" | "length"
    logprobs: Optional[list[LogprobEntry]]  # None unless SamplingParams.logprobs was set


class LLM:
    """An `LLMEngine` with a blocking batch `generate`; ``engine_kwargs`` go to `LLMEngine`."""

    def __init__(self, checkpoint: Union[str, Path], **engine_kwargs: Any) -> None:
        self.engine = LLMEngine(checkpoint, **engine_kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Union[str, list[int], list[Union[str, list[int]]]],
        params: Union[SamplingParams, list[SamplingParams], None] = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); one SamplingParams for all, or one each."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        if params is None or isinstance(params, SamplingParams):
            params = [params if params is not None else self.engine.sampling_params()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        ids, prompt_ids = [], []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p))
                prompt_ids.append(engine.scheduler.get(ids[-1]).prompt_token_ids)
        except ValueError:
            for rid in ids:
                engine.abort(rid)
            raise
        results: dict[str, dict] = {rid: {"text": [], "tokens": [], "logprobs": None, "reason": None} for rid in ids}
        while engine.has_unfinished():
            for out in engine.step():
                r = results.get(out.request_id)
                if r is None:  # someone else's request on a shared engine
                    continue
                r["text"].append(out.new_text)
                r["tokens"] += out.new_token_ids
                if out.logprobs is not None:
                    r["logprobs"] = (r["logprobs"] or []) + out.logprobs
                if out.finished:
                    r["reason"] = out.finish_reason
        outputs = []
        for rid, prompt, tokens in zip(ids, prompts, prompt_ids):
            r = results[rid]
            outputs.append(RequestOutput(rid, prompt if isinstance(prompt, str) else None, tokens,
                                         "".join(r["text"]), r["tokens"], r["reason"], r["logprobs"]))
        return outputs

    def chat(
        self,
        messages: Union[list[dict[str, str]], list[list[dict[str, str]]]],
        params: Union[SamplingParams, list[SamplingParams], None] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation or several (lists of ``{"role", "content"}``), each rendered
        in the model's chat template with the assistant header; the reply ends at the model's end
        of turn. ``chat_template_kwargs`` reach the template (e.g. ``{"enable_thinking": False}``)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        engine = self.engine
        prompts = [engine.encode_chat(c, chat_template_kwargs) for c in conversations]
        if params is None or isinstance(params, SamplingParams):
            params = [params if params is not None else engine.sampling_params()] * len(prompts)
        stops = engine.chat_stop_token_ids
        params = [replace(p, stop_token_ids=p.stop_token_ids + [t for t in stops if t not in p.stop_token_ids])
                  for p in params]
        outputs = self.generate(prompts, params)
        for out, conversation in zip(outputs, conversations):
            out.prompt = engine.chat_format.render(conversation, True, chat_template_kwargs)
        return outputs
