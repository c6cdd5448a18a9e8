"""litellm as a client of the proxy: what its openai and anthropic providers make of a stop.

litellm fetches a model price map from the internet at import unless told to use the
copy it ships; the variable must be set before the import.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import pytest
from conversations import LOOP, SEARCH, chat_messages
from fake_models import guarded

from guard.engine.problem import STOP_SIGNATURE

if hasattr(litellm, "telemetry"):  # older releases phone home unless turned off
    litellm.telemetry = False
litellm.suppress_debug_info = True  # its "Provider List" banners on stdout

STUCK = chat_messages([*LOOP, SEARCH])  # nudged at LOOP, repeated once more: a stop
RAN = sum(1 for step in LOOP if step == SEARCH)  # the times the search tool ran in LOOP
ROUTE_HEADER = "llm_provider-x-loopguard-route"  # litellm's name for a relayed header


def test_the_openai_provider_gets_the_stop_as_a_normal_completion() -> None:
    with guarded() as g:
        answer = litellm.completion(
            model="openai/gpt-test", api_base=g.openai_base, api_key="k", messages=STUCK
        )
        assert answer.id.startswith("chatcmpl-loopguard-")  # litellm keeps the id
        assert (answer.choices[0].message.content or "").startswith(STOP_SIGNATURE)
        assert not answer.choices[0].message.tool_calls
        assert answer._hidden_params["additional_headers"][ROUTE_HEADER] == "stop_and_review"
        assert g.fake.requests == []


def test_the_anthropic_provider_gets_the_stop_text_but_an_id_of_litellms_own() -> None:
    """litellm turns the Messages answer into a chat completion with a fresh id, so the
    ``msg_loopguard_`` marker is lost; the route header survives in its hidden params."""
    with guarded() as g:
        answer = litellm.completion(
            model="anthropic/claude-test",
            api_base=g.anthropic_base,
            api_key="k",
            max_tokens=5,
            messages=STUCK,
        )
        assert (answer.choices[0].message.content or "").startswith(STOP_SIGNATURE)
        assert not answer.id.startswith("msg_loopguard_")
        assert answer._hidden_params["additional_headers"][ROUTE_HEADER] == "stop_and_review"
        assert g.fake.requests == []


def test_on_stop_error_is_litellms_bad_request_error_carrying_loopguards_text() -> None:
    """Both providers raise ``litellm.BadRequestError`` (status 422): the
    openai provider's text is ``OpenAIException - <stop text>``, the anthropic
    provider's ``AnthropicException - <the problem+json body>``."""
    with guarded(on_stop="error") as g:
        with pytest.raises(litellm.BadRequestError) as openai_stop:
            litellm.completion(
                model="openai/gpt-test",
                api_base=g.openai_base,
                api_key="k",
                messages=STUCK,
                num_retries=0,
            )
        assert openai_stop.value.status_code == 422
        assert f"OpenAIException - {STOP_SIGNATURE}" in str(openai_stop.value)
        assert f"{RAN + 1} times" in str(openai_stop.value)
        with pytest.raises(litellm.BadRequestError) as anthropic_stop:
            litellm.completion(
                model="anthropic/claude-test",
                api_base=g.anthropic_base,
                api_key="k",
                max_tokens=5,
                messages=STUCK,
                num_retries=0,
            )
        assert anthropic_stop.value.status_code == 422
        text = str(anthropic_stop.value)
        assert "AnthropicException - {" in text and STOP_SIGNATURE in text
        assert "stalled-repeat" in text  # the raw problem body, its type included
        assert g.fake.requests == []
