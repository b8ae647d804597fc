"""One module per endpoint, each written against EngineClient."""
