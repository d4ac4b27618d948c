"""A GPT-2-style decoder with muP (Maximal Update Parametrization) and SP for comparison.

Width = n_head * head_width. The width multiplier is m = width / base_width, where base_width is the
base model's width (d_model): widening by heads, by head width or both gives the same m, and so the
same LRs, inits and logit multiplier, at the same width. base_head_width is the base model's head
width; it sets the attention rule only (muP's 1/d_head is per head). base_width = 0 means
n_head * base_head_width: the base has this model's head count.
The base must be a whole number of heads (base_width a multiple of base_head_width).
The depth multiplier is d = n_layer / base_n_layer.
Every width- and depth-dependent choice lives in `mup_rules` below; this table is the whole of it.
Width: Tensor Programs V (Yang et al. 2022), Table 8, with the readout in the Table 3 "output
multiplier" form of microsoft/mup's MuReadout + MuAdam. Depth: CompleteP (Dey et al. 2025), Table 1,
as its reference implementation (nanoGPT-mup, completep branch) applies it; alpha = 1 is CompleteP,
0.5 the 1/sqrt(L) depth-muP, 0 turns depth scaling off (every d term is 1, as it is at d = 1).

| parameter class         | examples                          | init std                  | AdamW LR          | AdamW decay | AdamW eps  |
|-------------------------|-----------------------------------|---------------------------|-------------------|-------------|------------|
| hidden (matrix-like)    | qkv, attn out, MLP in and out     | gain / sqrt(fan_in)       | lr / m * d^(a-1)  | wd / (LR/lr)| eps * d^-a |
| block vector            | Layer/RMSNorm gains, block biases | 1 / 0                     | lr * d^(a-1)      | 0           | eps * d^-a |
| embedding (vector-like) | token and position embeddings     | init_std                  | lr                | wd          | eps        |
| readout                 | lm_head (untied)                  | 0, or gain/sqrt(base_width) | lr              | wd          | eps        |
| final norm              | ln_f                              | 1 / 0                     | lr                | 0           | eps        |
| logits (forward)        | lm_head output                    | multiplied by output_mult / m                                      |
| attention (forward)     | q . k (after RoPE under llama)    | multiplied by attn_mult / d_head                                   |
| residual branch (fwd)   | each attention and MLP output     | multiplied by d^-a before it is added to the stream                |

Two architectures share this table (cfg.arch). gpt2: LayerNorm, GELU MLP (hidden 4 x width), learned
position table, biases. llama: RMSNorm (learnable gain, no bias), SwiGLU MLP (hidden mlp_hidden,
default 8/3 x width rounded up to a multiple of 64), rotary position embeddings (no position table,
no parameters), grouped-query attention (n_kv_head K/V heads shared by n_head / n_kv_head query heads
each), no biases, untied readout. The llama parameters fall into the same classes by name: the
RMSNorm gains in blocks (ln_1, ln_2) are block vectors; the fused q, k, v projection (width ->
width + 2 n_kv_head d_head, fan_in width) is hidden, like the attention output (fan_in width) and
SwiGLU's gate and up matrices (c_gate, c_fc: fan_in width); its down matrix (c_proj) is hidden with
fan_in mlp_hidden; ln_f is the final norm; wte the only embedding. RoPE rotates each (x_i, x_i+d/2)
pair of q and k by a position-dependent angle: a rotation keeps |q| and |k|, so q . k keeps muP's
1/d_head rule (and the optional zero-init of q). The depth rules are per block, so CompleteP applies
to the llama block unchanged: d^-a on each branch, the block's hidden and gain LRs and eps as above.

attn_mult defaults to sqrt(base_head_width), so muP's attn_mult / d_head equals SP's
1 / sqrt(d_head) at the base head width (SP: attn_mult / sqrt(base_head_width * d_head)). A model
widened by heads at the base's head width keeps the base's attention scale; one widened by head width
gets attn_mult / d_head.

SP (standard parametrization): hidden and readout init std gain / sqrt(fan_in) at the actual width,
no width factor in any LR, logits multiplied by output_mult, attention by attn_mult /
sqrt(base_head_width * d_head). At m = 1 muP and SP are the same network with the same optimizer.
The depth rules apply to both.

Depth: a block parameter's gradient carries the branch multiplier d^-a, so its Adam eps shrinks with
it (else eps would swamp the gradient in deep models); CompleteP's reference also scales eps by 1/m
for every group, which we leave out in width, as microsoft/mup does.

Weight-decay note: torch's AdamW shrinks a weight by lr_group * wd_group per step. We keep that
product independent of width and depth (wd_group = wd / lr_mult), so the pull towards zero per step
does not fade as hidden LRs shrink ("independent" weight decay).

Muon (--optimizer muon) steps the hidden class instead of AdamW (Muon's authors' split: hidden
matrices to Muon; embeddings, vectors and the readout to AdamW with their rows above unchanged). Muon's
update O is the momentum orthogonalized by Newton-Schulz: every singular value near 1, so its spectral
norm is about 1 whatever the width. Its width rule is the scale s(fan_out, fan_in) the update is
multiplied by, chosen by --muon_scale, in the hidden matrix's Muon LR: muon_lr * s * d^(a-1). The fused
q, k, v is orthogonalized and scaled block by block (GPT.muon_blocks).

| --muon_scale | s                          | source                                                               |
|--------------|----------------------------|----------------------------------------------------------------------|
| mup          | sqrt(fan_out / fan_in)     | the spectral condition for feature learning (Yang, Simon, Bernstein   |
|              |                            | 2023): ||dW||_2 ~ sqrt(fan_out/fan_in); Megatron-LM's unit_rms_norm   |
| moonlight    | 0.2 sqrt(max(fan_out, fan_in)) | Moonlight (Liu et al. 2025, "Muon is Scalable"): update RMS 0.2,  |
|              |                            | AdamW's; torch's adjust_lr_fn="match_rms_adamw". Grows as sqrt(width): |
|              |                            | not width-invariant (the comparison the flag exists for)             |
| none         | 1                          | the bare orthogonalized update                                       |

mup and none differ by a constant per matrix kind (the aspect ratios are fixed as the model widens), so
both keep the update's spectral norm width-independent; neither has a 1/m, which AdamW needs only because
its update's RMS, not its spectral norm, is fixed. Depth: Muon's orthogonalization, like Adam's
normalisation, removes the d^-a the branch puts on the gradient, so CompleteP's d^(a-1) LR carries over;
Adam's eps * d^-a does not (Muon's eps only guards a division by the gradient's norm). Decay stays
independent: wd / (LR/muon_lr).

Zero-initialised readout and query are init choices shared by both parametrizations.
Parameter classes come from names, never from shapes: under ZeRO-3 a parameter's local shape is (0,).
Each leaf module initialises itself in reset_parameters(), called from its own __init__, so the
init survives DeepSpeed zero.Init (which partitions each module right after its __init__) and
`model.apply(reset)` after building on the meta device.
"""  # noqa: E501 (the rules table above is one row per parameter class)
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 320  # padded to a multiple of 64 by the data layer
    block_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    head_width: int = 32
    parametrization: str = "mup"  # "mup" | "sp"
    base_head_width: int = 32  # the base model's head width (attention rule)
    base_width: int = 0  # the base model's width, m = width / base_width (0: n_head * base_head_width)
    base_n_layer: int = 0  # 0: the same as n_layer (no depth scaling)
    depth_alpha: float = 0.0
    init_std: float = 0.02  # embeddings
    hidden_gain: float = 1.0  # hidden init std = gain / sqrt(fan_in)
    output_mult: float = 1.0
    attn_mult: float = 0.0  # 0: sqrt(base_head_width)
    readout_zero_init: bool = True
    query_zero_init: bool = True  # microsoft/mup's advice; the trainer's default too
    bias: bool = True  # gpt2 only: llama has no biases
    arch: str = "gpt2"  # "gpt2" | "llama"
    n_kv_head: int = 0  # llama's K/V heads (grouped-query attention; 0: n_head)
    mlp_hidden: int = 0  # 0: 4 x width (gpt2), 8/3 x width rounded up to a multiple of 64 (llama)

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"--arch must be gpt2 or llama, not {self.arch!r}")
        if self.n_kv_head < 0 or self.mlp_hidden < 0:
            raise ValueError(f"--n_kv_head {self.n_kv_head} and --mlp_hidden {self.mlp_hidden} must be 0 or more "
                             "(0: the architecture's default)")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"--n_kv_head {self.n_kv_head} must divide --n_head {self.n_head} "
                             "(each K/V head serves n_head / n_kv_head query heads)")
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("--n_kv_head (grouped-query attention) is for --arch llama; gpt2 has one K/V head per "
                             "query head")
        if not self.mlp_hidden:
            self.mlp_hidden = 4 * self.width if self.arch == "gpt2" else 64 * math.ceil(8 * self.width / 3 / 64)
        if self.arch == "llama":
            self.bias = False
        if self.base_width < 0 or self.base_head_width < 1:
            raise ValueError(f"--base_width {self.base_width} and --base_head_width {self.base_head_width} must be "
                             "positive (--base_width 0: n_head x base_head_width)")
        self.base_width = self.base_width or self.n_head * self.base_head_width
        if self.base_width % self.base_head_width:
            raise ValueError(f"--base_width {self.base_width} is not a whole number of heads of --base_head_width "
                             f"{self.base_head_width}: give --base_head_width, the base model's head width")

    @property
    def width(self):
        return self.n_head * self.head_width

    @property
    def width_mult(self):
        return self.width / self.base_width

    @property
    def depth_mult(self):
        return self.n_layer / (self.base_n_layer or self.n_layer)


@dataclass(frozen=True)
class Rule:
    init_std: float
    lr_mult: float
    wd_mult: float
    eps_mult: float = 1.0


def param_class(name):
    """hidden | block_vector | embedding | readout | final_norm, from the parameter's name alone."""
    if name.startswith("ln_f."):
        return "final_norm"
    if name.endswith(".bias") or ".ln_" in name:  # every bias is inside a block (lm_head has none)
        return "block_vector"
    if name.startswith(("wte.", "wpe.")):
        return "embedding"
    if name.startswith("lm_head."):
        return "readout"
    return "hidden"


MUON_SCALES = {"mup": lambda fan_out, fan_in: math.sqrt(fan_out / fan_in),
               "moonlight": lambda fan_out, fan_in: 0.2 * math.sqrt(max(fan_out, fan_in)),
               "none": lambda fan_out, fan_in: 1.0}


def mup_rules(cfg, fan_in, fan_out=None, muon_scale=None):
    """The muP / SP rule for each parameter class, given a hidden matrix's fan_in (the table above); with
    muon_scale, also "muon": the hidden matrix's rule when Muon steps it (its LR relative to --muon_lr)."""
    m = cfg.width_mult if cfg.parametrization == "mup" else 1.0
    a = cfg.depth_alpha
    depth_lr, depth_eps = (cfg.depth_mult ** (a - 1), cfg.depth_mult ** -a) if a else (1.0, 1.0)
    hidden_lr = depth_lr / m
    if cfg.parametrization == "mup":
        readout_std = cfg.hidden_gain / math.sqrt(cfg.base_width)
    else:
        readout_std = cfg.hidden_gain / math.sqrt(cfg.width)
    rules = {
        "hidden": Rule(cfg.hidden_gain / math.sqrt(fan_in), hidden_lr, 1 / hidden_lr, depth_eps),
        "block_vector": Rule(0.0, depth_lr, 0.0, depth_eps),
        "embedding": Rule(cfg.init_std, 1.0, 1.0),
        "readout": Rule(0.0 if cfg.readout_zero_init else readout_std, 1.0, 1.0),
        "final_norm": Rule(0.0, 1.0, 0.0),
    }
    if muon_scale is not None:
        muon_lr = MUON_SCALES[muon_scale](fan_out, fan_in) * depth_lr
        rules["muon"] = Rule(rules["hidden"].init_std, muon_lr, 1 / muon_lr)
    return rules


def output_scale(cfg):
    """Logit multiplier: output_mult / m under muP, output_mult under SP."""
    return cfg.output_mult / (cfg.width_mult if cfg.parametrization == "mup" else 1.0)


def attention_scale(cfg):
    attn_mult = cfg.attn_mult or math.sqrt(cfg.base_head_width)
    if cfg.parametrization == "mup":
        return attn_mult / cfg.head_width
    return attn_mult / math.sqrt(cfg.base_head_width * cfg.head_width)


def residual_scale(cfg):
    return cfg.depth_mult ** -cfg.depth_alpha


class Linear(nn.Linear):
    """nn.Linear that draws N(0, std^2) weights and zero biases in its own reset_parameters."""

    def __init__(self, fan_in, fan_out, bias, std):
        self.std = std  # set before nn.Linear.__init__, which calls reset_parameters()
        super().__init__(fan_in, fan_out, bias=bias)

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.std) if self.std > 0 else nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    def __init__(self, num, dim, std):
        self.std = std
        super().__init__(num, dim)

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.std)


class QKV(Linear):
    """The fused q, k, v projection (k and v narrower under grouped-query attention); the q rows can start
    at zero (muP's optional query zero-init)."""

    def __init__(self, width, kv_width, bias, std, zero_query):
        self.zero_query = zero_query
        super().__init__(width, width + 2 * kv_width, bias, std)

    def reset_parameters(self):
        super().reset_parameters()
        if self.zero_query:
            with torch.no_grad():
                self.weight[: self.in_features].zero_()


class Identity(nn.Module):
    """A named no-op so hooks can read q, k and attention logits (coordinate checks)."""

    def forward(self, x):
        return x


def rope(x, base=10000.0):
    """Rotary position embedding of x (B, heads, T, d): the pair (x_i, x_{i+d/2}) at position t turns by
    t * base^(-2i/d). Computed in forward from T and d (no buffers: nothing for zero.Init, FSDP2 or a
    meta-device build to place)."""
    T, d = x.shape[-2], x.shape[-1]
    inv_freq = base ** -(torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angle = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        rules = mup_rules(cfg, cfg.width)
        self.n_head, self.n_kv_head, self.head_width = cfg.n_head, cfg.n_kv_head, cfg.head_width
        self.rotary = cfg.arch == "llama"
        self.scale = attention_scale(cfg)
        self.c_attn = QKV(cfg.width, cfg.n_kv_head * cfg.head_width, cfg.bias, rules["hidden"].init_std,
                          cfg.query_zero_init)
        self.c_proj = Linear(cfg.width, cfg.width, cfg.bias, rules["hidden"].init_std)
        self.q, self.k, self.attn_logits = Identity(), Identity(), Identity()
        self.record_logits = False  # coordinate checks compute the logits explicitly

    def forward(self, x):
        B, T, C = x.shape
        kv = self.n_kv_head * self.head_width
        q, k, v = self.c_attn(x).split([C, kv, kv], dim=2)
        q = q.view(B, T, self.n_head, self.head_width).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_width).transpose(1, 2) for t in (k, v))
        if self.rotary:
            q, k = rope(q), rope(k)
        q, k = self.q(q), self.k(k)
        gqa = self.n_kv_head != self.n_head
        if self.record_logits:  # only the entries attention uses: position t sees positions <= t
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            kk = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1) if gqa else k
            self.attn_logits((q @ kk.transpose(-2, -1) * self.scale)[..., causal])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Linear(cfg.width, cfg.mlp_hidden, cfg.bias, mup_rules(cfg, cfg.width)["hidden"].init_std)
        self.c_proj = Linear(cfg.mlp_hidden, cfg.width, cfg.bias, mup_rules(cfg, cfg.mlp_hidden)["hidden"].init_std)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class SwiGLU(nn.Module):
    """llama's MLP: c_proj(silu(c_gate(x)) * c_fc(x)); gate and up have fan_in width, down (c_proj) mlp_hidden."""

    def __init__(self, cfg):
        super().__init__()
        std_in = mup_rules(cfg, cfg.width)["hidden"].init_std
        self.c_gate = Linear(cfg.width, cfg.mlp_hidden, False, std_in)
        self.c_fc = Linear(cfg.width, cfg.mlp_hidden, False, std_in)
        self.c_proj = Linear(cfg.mlp_hidden, cfg.width, False, mup_rules(cfg, cfg.mlp_hidden)["hidden"].init_std)

    def forward(self, x):
        return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))


def norm(cfg):
    """gpt2: LayerNorm; llama: RMSNorm with a learnable gain (both start at 1; ones_ in their reset_parameters)."""
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.width, eps=1e-5)
    return nn.LayerNorm(cfg.width, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.arch == "llama" else MLP(cfg)
        self.branch_scale = residual_scale(cfg)

    def forward(self, x):
        x = x + self.branch_scale * self.attn(self.ln_1(x))
        return x + self.branch_scale * self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.parametrization not in ("mup", "sp"):
            raise ValueError(f"parametrization must be 'mup' or 'sp', not {cfg.parametrization!r}")
        self.cfg = cfg
        rules = mup_rules(cfg, cfg.width)
        self.wte = Embedding(cfg.vocab_size, cfg.width, rules["embedding"].init_std)
        if cfg.arch == "gpt2":  # llama's positions are rotary (in attention)
            self.wpe = Embedding(cfg.block_size, cfg.width, rules["embedding"].init_std)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg)
        self.lm_head = Linear(cfg.width, cfg.vocab_size, False, rules["readout"].init_std)
        self.logit_scale = output_scale(cfg)

    def reset_parameters(self):
        """Re-initialise every parameter (after building on the meta device and `to_empty`)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def param_rules(self, muon_scale=None):
        """name -> (class, Rule) for every parameter, from names and the config alone; with muon_scale the
        hidden matrices are class "muon" (Muon steps them)."""
        w, kv, h = self.cfg.width, self.cfg.n_kv_head * self.cfg.head_width, self.cfg.mlp_hidden
        fans = {"c_attn": (w, w + 2 * kv), "c_fc": (w, h), "c_gate": (w, h), "attn.c_proj": (w, w),
                "mlp.c_proj": (h, w)}
        out = {}
        for name, _ in self.named_parameters():
            cls = param_class(name)
            if muon_scale is not None and cls == "hidden":
                cls = "muon"
            key = next((k for k in fans if f".{k}." in f".{name}"), None)
            fan_in, fan_out = fans[key] if key else (w, w)
            if cls == "muon" and key == "c_attn":  # q's block sets the LR; muon_blocks scales k and v
                fan_out = w
            out[name] = (cls, mup_rules(self.cfg, fan_in, fan_out, muon_scale)[cls])
        return out

    def muon_blocks(self, muon_scale):
        """name -> (rows, scales) for a matrix Muon orthogonalizes block by block: the fused q, k, v, as
        separate projections (modded-nanogpt's and Megatron-LM's split qkv), each block's update scaled by
        its own s(fan_out, fan_in) relative to q's. One Newton-Schulz over the fused matrix would share its
        unit singular values among q, k and v by their gradients' sizes, and q's share shrinks with width."""
        w, kv = self.cfg.width, self.cfg.n_kv_head * self.cfg.head_width
        scale = MUON_SCALES[muon_scale]
        rel = scale(kv, w) / scale(w, w)
        return {name: ((w, kv, kv), (1.0, rel, rel)) for name, _ in self.named_parameters()
                if name.endswith("attn.c_attn.weight")}

    def forward(self, idx, targets=None):
        x = self.wte(idx)
        if self.cfg.arch == "gpt2":
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.head(x, targets)

    def head(self, x, targets=None):
        """Final norm and readout: the logits, or with targets the mean cross-entropy (in fp32)."""
        logits = self.lm_head(self.ln_f(x)) * self.logit_scale
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
