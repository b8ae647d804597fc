"""What the API answers, as msgspec Structs: every body and stream event, one module per family.

Serving builds these; the HTTP edge encodes them once (msgspec, a few times faster than dicts
through `json`); a Ray replica hands them to the ingress as they are. A field that OpenAI's
schema makes optional (absent, not null) is `UNSET` until set, so it is left out of the JSON.
"""
