"""The Vidu Q1 Reference-to-Video API as the pipeline meets it: the contract as code, the typed
errors, how answers are read, the HTTP client (retries, deadlines, downloads), and where the
service is (the real one with a key, the embedded simulator without)."""
