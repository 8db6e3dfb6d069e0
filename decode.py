"""Decoding with a KV cache: the cache, prefill, one decode step of static shapes, and that step as a CUDA graph.

gpt-fast's approach (pytorch-labs/gpt-fast, generate.py: prefill / decode_one_token, a preallocated cache): keys and
values of every layer live in buffers of a fixed length, allocated once. `prefill` runs the whole prompt in one
forward; unpadded rows of one length need no mask, so SDPA gets is_causal=True and can run its flash kernel.
`decode_one_token` then feeds one token per row at a position held in a device tensor: it writes the new key and
value into their slot with index_copy_ and attends to the whole buffer under a mask of the filled slots, so every
tensor has the same shape and address at every step. That is what a CUDA graph needs: on a GPU the step is
captured once and each new token is one `graph.replay()` (one launch instead of ~20 per layer from Python, which at
batch 8 is most of a step's time). On the CPU the same step runs eagerly; there is no graph to capture.

Shapes: B batch, T prompt positions, S_max cache slots, nkv key/value heads, hs head dim, C width, V vocab.
"""
import torch


class KVCache:
    """Preallocated keys and values for every layer, (B, nkv, S_max, hs) each; `length` positions are filled.

    Two ways to write. A forward with `write_at` None writes slots [length, length + T) and attends to the filled
    ones (the attention sees (B, nkv, S, hs)); the caller advances `length`. With `write_at` set (a device tensor of
    slots, the static decode step), it writes there with index_copy_ and returns the whole buffers: the step's mask
    hides the slots not yet filled."""

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int, *, dtype,
                 device):
        shape = (batch_size, kv_heads, max_len, head_dim)  # (B, nkv, S_max, hs)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots = torch.arange(max_len, device=device)  # (S_max,): the static step's mask compares against it
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.write_at: torch.Tensor | None = None

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k, v (B, nkv, T, hs); return the keys and values to attend to."""
        if self.write_at is not None:
            self.keys[layer_idx].index_copy_(2, self.write_at, k)  # (B, nkv, S_max, hs), slots write_at
            self.values[layer_idx].index_copy_(2, self.write_at, v)
            return self.keys[layer_idx], self.values[layer_idx]  # (B, nkv, S_max, hs) each
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len or k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache is (batch {self.batch_size}, max_len {self.max_len}) with {start} filled; "
                             f"cannot add {k.shape[2]} positions of batch {k.shape[0]}: make a larger new_kv_cache")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]  # (B, nkv, S, hs) each


def prefill(llm, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The prompts (B, T, C), all real tokens, through the decoder into an empty cache: last-position logits
    (B, V) in fp32. No attention mask: SDPA's is_causal path (flash attention on a GPU)."""
    if cache.length:
        raise ValueError(f"prefill needs an empty KV cache; this one holds {cache.length} positions")
    hidden = llm.hidden_states(inputs_embeds=embeds, kv_cache=cache)  # (B, T, C)
    return llm.logits_from_hidden(hidden[:, -1]).float()  # (B, V)


def decode_one_token(llm, cache: KVCache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One new token per row, token (B, 1), at slot `position` (1,), a device tensor: logits (B, V) in fp32.
    Static shapes and no host read, so the whole step can be captured in a CUDA graph."""
    x = llm.model.embed_tokens(token)  # (B, 1, C)
    cos, sin = llm.model.rotary_emb(position[None], x.dtype)  # (1, 1, hs) each
    mask = (cache.slots <= position)[None, None, None]  # (S_max,) -> (1, 1, 1, S_max): filled slots and this one
    cache.write_at = position
    try:
        hidden = llm.run_layers(x, cos, sin, mask, cache)  # (B, 1, C)
    finally:
        cache.write_at = None
    return llm.logits_from_hidden(hidden[:, -1]).float()  # (B, V)


def forget_adapter_norms(llm) -> None:
    """Drop DoRA's cached row norms (lora.LoRALinear), so a captured step computes them inside the graph from the
    adapters' current values instead of baking in one step's norm."""
    for module in llm.modules():
        if hasattr(module, "forget_weight_norm"):
            module.forget_weight_norm()


class Decoder:
    """A cache for batch B and S_max slots, and the decode step over it: on a GPU with cuda_graphs, captured as a
    CUDA graph at the first step and replayed after; else eager. The graph reads the weights and adapters at their
    addresses, so in-place training updates are seen; `matches` tells the caller when a new Decoder is needed
    (another batch size, a longer generation, or parameters moved)."""

    def __init__(self, llm, batch_size: int, max_len: int, *, cuda_graphs: bool = True):
        self.llm, self.batch_size, self.max_len = llm, batch_size, max_len
        self.parameters_at = parameter_addresses(llm)
        self.cache = llm.new_kv_cache(batch_size, max_len)
        device = self.cache.slots.device
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.use_graph, self.graph = cuda_graphs and device.type == "cuda", None

    def matches(self, batch_size: int, max_len: int) -> bool:
        """Usable for this batch size and at least max_len slots, with the parameters where they were (unfilled
        slots are masked, so a longer cache gives the same numbers)."""
        return (batch_size == self.batch_size and max_len <= self.max_len and
                parameter_addresses(self.llm) == self.parameters_at)

    def capture(self) -> None:
        """Warm up on a side stream (cuBLAS and bitsandbytes set up their state), then capture one step. Called
        at the first step, with that step's token and position in place: the warm-up writes the very key and value
        the step itself writes (torch.cuda.graphs' recipe, no slot of the prompt touched)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_one_token(self.llm, self.cache, self.token, self.position)
        torch.cuda.current_stream().wait_stream(stream)
        forget_adapter_norms(self.llm)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = decode_one_token(self.llm, self.cache, self.token, self.position)  # (B, V)
        except RuntimeError as error:
            raise RuntimeError(f"capturing the decode step in a CUDA graph failed ({error}); set the model's "
                               f"decode_with_cuda_graphs = False to decode eagerly") from error
        forget_adapter_norms(self.llm)  # the norms cached during capture live in the graph's memory pool

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, C) prompts -> (B, V) logits of their last position; the cache is reset first."""
        self.cache.length = 0
        logits = prefill(self.llm, embeds, self.cache)
        self.cache.length = embeds.shape[1]
        return logits

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """token (B,) at slot `position` -> (B, V) logits; with a graph, valid until the next step."""
        if position >= self.cache.max_len:
            raise ValueError(f"position {position} is past the cache's {self.cache.max_len} slots")
        self.token.copy_(token[:, None])
        self.position.fill_(position)  # a host scalar into a device tensor: no synchronisation
        if not self.use_graph:
            return decode_one_token(self.llm, self.cache, self.token, self.position)
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits


def parameter_addresses(llm) -> tuple:
    """Where every parameter lives: a captured step reads them there (a .to() or a swapped module moves them)."""
    return tuple(p.data_ptr() for p in llm.parameters())
