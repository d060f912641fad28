"""The root agents' wire contracts, declared once: the agent's handlers and omad's clients import these.

One module per agent. Requests are parsed with `schema.parse` on the agent's side and built as these
dataclasses on omad's; answers are declared on the agent's routes (its OpenAPI document) and parsed into
these dataclasses by omad's clients. Keys an answer has beyond a declaration are ignored by the parser.
"""
