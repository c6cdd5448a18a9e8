"""The names loopguard emits: GenAI semantic conventions (v1.41.1) and its own.

Every attribute key and metric name on a span or metric point is one of these
constants; ``tests/unit/test_telemetry.py`` checks each against the semconv package.
"""

from __future__ import annotations

from opentelemetry.semconv._incubating.attributes import (
    error_attributes,
    gen_ai_attributes,
    jsonrpc_attributes,
    mcp_attributes,
    server_attributes,
)
from opentelemetry.semconv.attributes import http_attributes
from opentelemetry.semconv.schemas import Schemas

SCHEMA_URL = Schemas.V1_41_1.value
SEMCONV_VERSION = "1.41.1"
INSTRUMENTATION_NAME = "loopguard"

GA = gen_ai_attributes
# Semconv constants that exist for what we emit.
ATTR_OPERATION = GA.GEN_AI_OPERATION_NAME
ATTR_PROVIDER = GA.GEN_AI_PROVIDER_NAME
ATTR_REQUEST_MODEL = GA.GEN_AI_REQUEST_MODEL
ATTR_RESPONSE_MODEL = GA.GEN_AI_RESPONSE_MODEL
ATTR_RESPONSE_ID = GA.GEN_AI_RESPONSE_ID
ATTR_FINISH_REASONS = GA.GEN_AI_RESPONSE_FINISH_REASONS
ATTR_INPUT_TOKENS = GA.GEN_AI_USAGE_INPUT_TOKENS
ATTR_OUTPUT_TOKENS = GA.GEN_AI_USAGE_OUTPUT_TOKENS
# Value "gen_ai.usage.cache_read.input_tokens" in this semconv release.
ATTR_CACHE_READ_TOKENS = GA.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS
ATTR_STREAM = GA.GEN_AI_REQUEST_STREAM
ATTR_TTFC = GA.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK
ATTR_TOOL_NAME = GA.GEN_AI_TOOL_NAME
ATTR_CONVERSATION_ID = GA.GEN_AI_CONVERSATION_ID
ATTR_TOKEN_TYPE = GA.GEN_AI_TOKEN_TYPE
ATTR_SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
ATTR_SERVER_PORT = server_attributes.SERVER_PORT
ATTR_ERROR_TYPE = error_attributes.ERROR_TYPE
ATTR_MCP_METHOD = mcp_attributes.MCP_METHOD_NAME
ATTR_MCP_SESSION = mcp_attributes.MCP_SESSION_ID
ATTR_JSONRPC_ID = jsonrpc_attributes.JSONRPC_REQUEST_ID
ATTR_HTTP_STATUS = http_attributes.HTTP_RESPONSE_STATUS_CODE

# Well-known gen_ai.operation.name values (GenAiOperationNameValues; that enum is marked
# deprecated in this semconv release, so its values are spelled here and checked in tests).
OP_CHAT = "chat"
OP_EXECUTE_TOOL = "execute_tool"

# The guard's own attributes (no convention exists for them).
LG_ROUTE = "loopguard.route"
LG_FAILURE_STAGE = "loopguard.failure.stage"
LG_PARAMS_HASH = "loopguard.params.hash"
LG_PROGRESS_MARKER = "loopguard.progress.marker"
LG_REPEAT_COUNT = "loopguard.repeat.count"
LG_STALL_RULE = "loopguard.stall.rule"
LG_SCRUB_POLICY = "loopguard.scrub.policy"
LG_SESSION_TRACKED = "loopguard.session.tracked"
LG_OUTPUT_THROUGHPUT = "loopguard.output.throughput"
LG_TIMING_MALFORMED = "loopguard.timing.malformed"
LG_USAGE_SOURCE = "loopguard.usage.source"

METRIC_STOPS = "loopguard.stops"

# The only keys of CallRecord.captured that may reach a span (when capture is on).
CAPTURE_ATTRIBUTES = frozenset(
    {
        GA.GEN_AI_INPUT_MESSAGES,
        GA.GEN_AI_OUTPUT_MESSAGES,
        GA.GEN_AI_SYSTEM_INSTRUCTIONS,
        GA.GEN_AI_TOOL_CALL_ARGUMENTS,
        GA.GEN_AI_TOOL_CALL_RESULT,
    }
)
