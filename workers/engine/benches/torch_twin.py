"""PyTorch twin of flywheel-engine's transformer, for `cargo bench -p flywheel-engine --bench
engine -- --peer torch`.

The same architecture (byte vocabulary, RoPE, RMSNorm, grouped-query causal attention, gated SiLU
MLP, LM head), loaded from the engine's own safetensors, trained on the engine's own batches with
the engine's optimiser (AdamW, warm-up then linear decay, global-norm clipping). Prints one JSON
line: parameter count, the loss of the first SFT and DPO batches before any step (which the
benchmark compares with the engine's, to show it is the same computation), the wall time of
the SFT and DPO steps, and greedy KV-cached sampling of the engine's prompt batches (left-padded,
as a batched PyTorch sampler does it): the tokens, for the benchmark to compare, and the time.

usage: torch_twin.py WORKDIR THREADS
"""

import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

MASKED = -1e9


def rms_norm(x, w):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


class Twin(torch.nn.Module):
    def __init__(self, cfg, weights):
        super().__init__()
        self.cfg = cfg
        self.p = torch.nn.ParameterDict(
            {k.replace(".", "__"): torch.nn.Parameter(v.clone()) for k, v in weights.items()}
        )
        dh = cfg["d_model"] // cfg["n_heads"]
        inv = torch.tensor(
            [1.0 / cfg["rope_theta"] ** (2.0 * i / dh) for i in range(dh // 2)], dtype=torch.float32
        )
        angles = torch.arange(cfg["max_seq"], dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = angles.cos(), angles.sin()
        t = cfg["max_seq"]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        self.mask = torch.where(j > i, MASKED, 0.0).to(torch.float32)

    def w(self, name):
        return self.p[name.replace(".", "__")]

    def hidden(self, tokens, start=0, cache=None, key_mask=None):
        """Final-normed hidden states of `tokens` (b, t) at positions start..start + t. With a
        cache (one entry per layer) they continue the cached sequence and their keys and values
        are appended to it; `key_mask` (b, 1, 1, max_seq) masks a batch's left pads."""
        c = self.cfg
        b, t = tokens.shape
        h_, kvh = c["n_heads"], c["n_kv_heads"]
        dh = c["d_model"] // h_
        total = start + t
        mask = self.mask[start:total, :total]
        if key_mask is not None:
            mask = mask + key_mask[:, :, :, :total]
        cos, sin = self.cos[start:total], self.sin[start:total]
        half = dh // 2

        def rope(x):
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

        x = self.w("embed")[tokens]
        for layer in range(c["n_layers"]):
            p = f"layers.{layer}."
            h = rms_norm(x, self.w(p + "attn_norm"))
            q = rope((h @ self.w(p + "wq").T).view(b, t, h_, dh).transpose(1, 2))
            k = rope((h @ self.w(p + "wk").T).view(b, t, kvh, dh).transpose(1, 2))
            v = (h @ self.w(p + "wv").T).view(b, t, kvh, dh).transpose(1, 2)
            if cache is not None:
                if cache[layer] is not None:
                    k, v = torch.cat([cache[layer][0], k], 2), torch.cat([cache[layer][1], v], 2)
                cache[layer] = (k, v)
            rep, n = h_ // kvh, k.shape[2]
            k = k.unsqueeze(2).expand(b, kvh, rep, n, dh).reshape(b, h_, n, dh)
            v = v.unsqueeze(2).expand(b, kvh, rep, n, dh).reshape(b, h_, n, dh)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + mask, dim=-1)
            o = (att @ v).transpose(1, 2).reshape(b, t, h_ * dh)
            x = x + o @ self.w(p + "wo").T
            h = rms_norm(x, self.w(p + "mlp_norm"))
            x = x + (F.silu(h @ self.w(p + "w_gate").T) * (h @ self.w(p + "w_up").T)) @ self.w(
                p + "w_down"
            ).T
        return rms_norm(x, self.w("final_norm"))

    def forward(self, tokens):
        return self.hidden(tokens) @ self.w("lm_head").T

    def step(self, tokens, cache, start, key_mask):
        """Next-token logits of the last position of `tokens`, which continue the cached sequence
        at position `start`."""
        return self.hidden(tokens, start, cache, key_mask)[:, -1] @ self.w("lm_head").T


@torch.inference_mode()
def sample_greedy(model, prompts, pads, max_tokens, end):
    """Greedy samples of a left-padded prompt batch, each up to its end token or `max_tokens`."""
    b, width = prompts.shape
    key_mask = torch.where(
        torch.arange(model.cfg["max_seq"])[None, :] < pads[:, None], MASKED, 0.0
    ).view(b, 1, 1, -1)
    cache = [None] * model.cfg["n_layers"]
    logits = model.step(prompts, cache, 0, key_mask)
    out = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for n in range(max_tokens):
        nxt = logits.argmax(-1)
        for r in range(b):
            if not done[r]:
                out[r].append(int(nxt[r]))
        done |= nxt == end
        if bool(done.all()) or n + 1 == max_tokens:
            break
        logits = model.step(nxt[:, None], cache, width + n, key_mask)
    return out


def token_logprobs(model, inputs, targets):
    logp = torch.log_softmax(model(inputs), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sft_loss(lp, mask):
    return -(lp * mask).sum() / max(float(mask.sum()), 1.0)


def schedule(cfg, step):
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    rest = max(cfg["steps"] - cfg["warmup"], 1)
    return cfg["lr"] * (1.0 - 0.9 * min((step - cfg["warmup"]) / rest, 1.0))


def train(model, train_cfg, batches, loss_fn):
    """The engine's train_loop: returns (first loss, seconds for all steps)."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"], eps=1e-8
    )
    first = None
    began = time.perf_counter()
    for step, batch in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = schedule(train_cfg, step)
        loss = loss_fn(batch)
        value = float(loss)
        if first is None:
            first = value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
        if norm > train_cfg["grad_clip"]:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(train_cfg["grad_clip"] / norm)
        opt.step()
    return first, time.perf_counter() - began


def batches_of(tensors, prefix):
    n = len({k.split(".")[1] for k in tensors if k.startswith(prefix + ".")})
    return [
        (tensors[f"{prefix}.{i}.inputs"], tensors[f"{prefix}.{i}.targets"], tensors[f"{prefix}.{i}.mask"])
        for i in range(n)
    ]


def main():
    work, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    meta = json.load(open(f"{work}/meta.json"))
    cfg, train_cfg, beta, sft_weight = meta["model"], meta["train"], meta["beta"], meta["sft_weight"]
    weights = load_file(f"{work}/model.safetensors")
    data = load_file(f"{work}/batches.safetensors")
    data = {k: (v.long() if not k.endswith(".mask") else v) for k, v in data.items()}

    policy = Twin(cfg, weights)
    params = sum(p.numel() for p in policy.parameters())

    def sft(batch):
        inputs, targets, mask = batch
        return sft_loss(token_logprobs(policy, inputs, targets), mask)

    sft_first, sft_s = train(policy, dict(train_cfg, steps=meta["sft_steps"]), batches_of(data, "sft"), sft)

    # DPO from the same starting weights, against a frozen copy of them.
    policy = Twin(cfg, weights)
    reference = Twin(cfg, weights)
    for p in reference.parameters():
        p.requires_grad_(False)

    def dpo(batch):
        inputs, targets, mask = batch
        n = inputs.shape[0] // 2
        lp = token_logprobs(policy, inputs, targets)
        seq = (lp * mask).sum(-1)
        with torch.no_grad():
            ref = (token_logprobs(reference, inputs, targets) * mask).sum(-1)
        delta = (seq[:n] - ref[:n]) - (seq[n:] - ref[n:])
        loss = -F.logsigmoid(beta * delta).mean()
        return loss + sft_weight * sft_loss(lp[:n], mask[:n])

    dpo_first, dpo_s = train(policy, dict(train_cfg, steps=meta["dpo_steps"]), batches_of(data, "dpo"), dpo)

    sampler = Twin(cfg, weights)
    n_batches = len({k.split(".")[1] for k in data if k.startswith("sample.")})
    samples = []
    began = time.perf_counter()
    for i in range(n_batches):
        prompts, pads = data[f"sample.{i}.prompts"], data[f"sample.{i}.pads"]
        samples.extend(sample_greedy(sampler, prompts, pads, meta["sample_max_tokens"], meta["end"]))
    sample_s = time.perf_counter() - began
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "params": params,
                "sft_first_loss": sft_first,
                "sft_seconds": sft_s,
                "dpo_first_loss": dpo_first,
                "dpo_seconds": dpo_s,
                "sample_seconds": sample_s,
                "samples": samples,
            }
        )
    )


if __name__ == "__main__":
    main()
