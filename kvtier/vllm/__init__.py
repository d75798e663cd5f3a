"""The vLLM glue, and the only code that imports vLLM: the connector and its two
halves (scheduler, worker), the messages between them, KV cache groups and the
namespace as vLLM's configuration defines them."""
