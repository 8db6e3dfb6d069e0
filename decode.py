"""Generation over the model's KV cache (qwen3.KVCache): prefill, one decode step of static shapes, and that step as
a CUDA graph.

gpt-fast's approach (pytorch-labs/gpt-fast, generate.py: prefill / decode_one_token, a preallocated cache): keys and
values of every layer live in buffers of a fixed length, allocated once. `prefill` runs the whole prompt in one
forward; unpadded rows of one length need no mask, so SDPA gets is_causal=True and can run its flash kernel.
`decode_one_token` then feeds one token per row at a slot held in a device tensor: the cache writes the new key and
value there (its one write path, index_copy_) and the step attends to the whole buffer under a mask of the filled
slots, so every tensor has the same shape and address at every step. That is what a CUDA graph needs: on a GPU the
step is captured once and each new token is one `graph.replay()` (one launch instead of ~20 per layer from Python,
which at batch 8 is most of a step's time). On the CPU the same step runs eagerly; there is no graph to capture;
nor for a Qwen3-MoE model, whose expert dispatch reads to the host (Decoder.__init__ says so, the one place).

Shapes: B batch, T prompt positions, S_max cache slots, hs head dim, C width, V vocab.
"""
import torch

from qwen3 import KVCache, Qwen3


def prefill(llm: Qwen3, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The prompts (B, T, C), all real tokens, through the decoder into an empty cache (slots [0, T)): last-position
    logits (B, V) in fp32. No attention mask: SDPA's is_causal path (flash attention on a GPU)."""
    if cache.length:
        raise ValueError(f"prefill needs an empty KV cache; this one holds {cache.length} positions")
    hidden = llm.hidden_states(inputs_embeds=embeds, kv_cache=cache)  # (B, T, C)
    return llm.logits_from_hidden(hidden[:, -1]).float()  # (B, V)


def decode_one_token(llm: Qwen3, cache: KVCache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One new token per row, token (B, 1), written at cache slot `position` (1,), a device tensor: logits (B, V)
    in fp32. Static shapes and no host read, so the whole step can be captured in a CUDA graph; the caller claims
    the slot (KVCache.claim) outside the step."""
    x = llm.model.embed_tokens(token)  # (B, 1, C)
    cos, sin = llm.model.rotary_emb(position[None], x.dtype)  # (1, 1, hs) each
    mask = (cache.slots <= position)[None, None, None]  # (S_max,) -> (1, 1, 1, S_max): filled slots and this one
    hidden = llm.run_layers(x, cos, sin, mask, cache, position)  # (B, 1, C)
    return llm.logits_from_hidden(hidden[:, -1]).float()  # (B, V)


class Decoder:
    """A cache for batch B and S_max slots, and the decode step over it: on a GPU with cuda_graphs, captured as a
    CUDA graph at the first step and replayed after; else eager. The graph reads the weights and adapters at their
    addresses, so in-place training updates are seen (DoRA's norms too: a step captured inside
    lora.held_dora_norms, as VLM.generate captures it, reads the held norms, which every later hold rewrites in
    place, so replay it inside a hold as well); `matches` tells the caller when a new Decoder is needed (another batch size, a longer generation, or
    parameters or buffers moved)."""

    def __init__(self, llm, batch_size: int, max_len: int, *, cuda_graphs: bool = True):
        self.llm, self.batch_size, self.max_len = llm, batch_size, max_len
        self.parameters_at = parameter_addresses(llm)
        self.cache = llm.new_kv_cache(batch_size, max_len)
        device = self.cache.slots.device
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        # Never for Qwen3-MoE: its block reads each expert's token count to the host (moe.Qwen3MoeBlock), which a
        # captured graph cannot do; its steps run eagerly, with the same numbers.
        self.use_graph, self.graph = cuda_graphs and device.type == "cuda" and llm.config.moe is None, None

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
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = decode_one_token(self.llm, self.cache, self.token, self.position)  # (B, V)
        except RuntimeError as error:
            raise RuntimeError(f"capturing the decode step in a CUDA graph failed ({error}); set the model's "
                               f"decode_with_cuda_graphs = False to decode eagerly") from error

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, C) prompts -> (B, V) logits of their last position, into slots [0, T) of the emptied cache."""
        self.cache.reset()
        return prefill(self.llm, embeds, self.cache)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) into the cache's next slot -> (B, V) logits; with a graph, valid until the next step."""
        self.position.copy_(self.cache.claim(self.batch_size, 1))  # device to device: no synchronisation
        self.token.copy_(token[:, None])
        if not self.use_graph:
            return decode_one_token(self.llm, self.cache, self.token, self.position)
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits


def parameter_addresses(llm) -> tuple:
    """Where every parameter and buffer lives: a captured step reads them there (a .to() or a swapped module moves
    them)."""
    return tuple(t.data_ptr() for t in [*llm.parameters(), *llm.buffers()])
