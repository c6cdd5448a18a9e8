"""Ready integrations of the in-process ``Guard`` with agent frameworks.

One module per framework, each importing its framework only when imported itself (the
framework is an optional extra: ``loopguard[openai-agents]``, ``[langgraph]``,
``[pydantic-ai]``). Each uses the framework's own extension point so that a stopped call
reaches the model as a tool error it reads, and the run ends within the framework's
normal limits instead of crashing. This layer sits above ``guard.doors`` (it imports the
in-process Guard) and below ``guard.devtools`` and ``guard.cli``.
"""
