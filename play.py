"""Multi-turn rollouts: play whole episodes against an environment, and return them as one Rollout for GRPO.

An environment (a game) is any object with `messages()` (the chat before the model's first turn), `play(text) ->
reply` (takes the model's turn; returns the environment's next user message, or None when the episode is over) and
`done` (wordle.Game is one). One may also pause the model in the middle of its turn (calc.Calculator does): it lists
`stop_texts`, strings of any number of tokens ("</calc>"), and `pause(text) -> inline`: once the turn's text holds
one, generation stops there and the environment's `inline` text ("<result>5535</result>") is appended inside the
same turn, after which the model goes on (None: the episode ends there). The text given to play and pause is the
model's since the last pause or turn start. All episodes still running take their next turn in one generate()
call, so a batch of games costs at most max_turns calls however many games it holds.

An episode's trajectory is one token sequence: its opening prompt, then the model's tokens, the environment's
texts (a user message after a turn, or an inline text inside one), the model's next tokens, ... The model's tokens
are its sampled tokens exactly (with their stop token), and each environment text is tokenized on its own and
appended, so every later segment is sampled with the very tokens that training later feeds in (no re-tokenization
across a boundary: the sampler's log-probs equal the trainer's). In the Rollout:
- prompt_ids: the opening, shared by the G episodes of one example (grpo.token_logprobs forwards it once);
- completion_ids: everything after it, the environment's texts included; the model attends to all of it;
- completion_mask: True on the model's own tokens only, so the loss, the KL and the ratio see only what the
  model wrote; the environment's tokens are context, never a target (verifiers, willccbb, masks them the same
  way: its tokens carry a per-token mask of 0 for environment messages; nanochat masks its calculator's output
  alike; this is our own code);
- logprobs: the sampler's, at the model's tokens; lengths: the model's token count per episode; stopped: every
  turn of the episode ended on a stop token or a pause (False: some turn was cut at max_new_tokens).
A turn is one generate() call however often it pauses: a paused row is fed the environment's ids one per decode
step, while the other rows go on drawing (sample.generate's inject), and a turn's tokens, the inline ones included,
are at most max_new_tokens. Each turn prefills the episode's whole history again (no cache is kept across turns):
simple, and one batched prefill is cheap next to decoding a turn token by token.
Legend: N episodes, Tp opening time, Tc trajectory time, n episodes still running.
"""
from contextlib import nullcontext

import torch

from sample import Rollout, generate


def reply_ids(tok, text, last_id):
    """Token ids of the environment's message after a model turn that ended with last_id (ChatML)."""
    im_end = tok.tok.token_to_id("<|im_end|>")
    if im_end is None:
        raise ValueError(f"{tok.path}: no <|im_end|> token; multi-turn games need a ChatML tokenizer")
    # a turn that stopped on <|im_end|> has closed itself; one truncated (or stopped by another eos) is closed here
    close = "" if last_id == im_end else "<|im_end|>"
    return tok.encode(f"{close}\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


@torch.no_grad()
def play(model, tok, games, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, generators=None, group_size=1,
         amp=None, compile=False, pad_id=None, share_prefix=True):
    """Play every game to its end; returns (Rollout of N rows, the N trajectories as text, final stop token dropped)."""
    # generators: None (greedy), or one torch.Generator per game: a game's draws then do not depend on the others.
    # group_size: G, recorded in the Rollout (games g*G .. g*G+G-1 share an opening). amp: a context manager
    # (train.py's autocast) entered around each turn's generate call.
    if generators is not None and len(generators) != len(games):
        raise ValueError(f"got {len(generators)} generators for {len(games)} games")
    pad_id = tok.pad_id if pad_id is None else pad_id
    opening = [tok.encode_chat(g.messages()) for g in games]
    seq = [[] for _ in games]  # ids after the opening: model turns and replies
    own = [[] for _ in games]  # 1 where seq holds a model token
    lps = [[] for _ in games]  # the sampler's log-prob of each seq token (0 at reply tokens)
    stopped = [True] * len(games)  # every turn ended on a stop token
    stop_texts = tuple(sorted({s for g in games for s in getattr(g, "stop_texts", ())}))
    while True:
        live = [i for i, g in enumerate(games) if not g.done]  # (n,)
        if not live:
            break
        # generate draws one uniform per row per decode step until its whole batch is done, so a game's generator
        # would advance by the batch's longest turn; a fresh generator per turn, seeded by one draw of the game's
        # own, keeps each game's samples independent of which games share its batch (and its rank), however many
        # pauses or turns they make
        turn_gens = None if generators is None else [
            torch.Generator(g.device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=g, device=g.device)))
            for g in (generators[i] for i in live)]

        def inject(j, ids):  # a pause: the environment's inline text, tokenized on its own (None: the episode ends)
            text = games[live[j]].pause(tok.decode(ids))
            return None if text is None else tok.encode(text)

        with amp or nullcontext():
            ro = generate(model, [opening[i] + seq[i] for i in live], 1, max_new_tokens, temperature, top_p, top_k,
                          tok.stop_ids, turn_gens, tok.vocab_size, pad_id, compile, share_prefix=share_prefix,
                          stop_texts=stop_texts, decode=tok.decode, inject=inject)
        for j, i in enumerate(live):
            stop, mask = bool(ro.stopped[j]), ro.completion_mask[j].tolist()
            # the turn's slots: up to its last own token when it stopped, else the whole budget (it may end on
            # injected ids)
            n = (len(mask) - mask[::-1].index(True) if any(mask) else 0) if stop else len(mask)
            ids = ro.completion_ids[j, :n].tolist()
            seq[i] += ids
            own[i] += [int(m) for m in mask[:n]]
            lps[i] += ro.logprobs[j, :n].tolist()
            stopped[i] &= stop
            if games[i].done:  # ended at a pause (calc: one call too many)
                continue
            last = mask[:n][::-1].index(False) if False in mask[:n] else n  # the turn's last segment: own tokens
            text = games[i].play(tok.decode(ids[n - last:n - int(stop)]))  # the reply, or None: game over
            if text is not None:
                env = reply_ids(tok, text, ids[-1] if stop else None)
                seq[i] += env
                own[i] += [0] * len(env)
                lps[i] += [0.0] * len(env)

    own_last = [bool(o) and o[-1] == 1 for o in own]  # the episode ends on a model token (a final stop token)
    dev = model.lm_head.weight.device
    N, Tp, Tc = len(games), max(map(len, opening)), max(map(len, seq))
    prompt_ids = torch.full((N, Tp), pad_id, dtype=torch.long)
    completion_ids = torch.full((N, Tc), pad_id, dtype=torch.long)
    mask, logprobs = torch.zeros(N, Tc, dtype=torch.bool), torch.zeros(N, Tc)
    for i in range(N):  # prompts left-padded, trajectories right-padded, like generate's
        prompt_ids[i, Tp - len(opening[i]):] = torch.tensor(opening[i])
        completion_ids[i, :len(seq[i])] = torch.tensor(seq[i], dtype=torch.long)
        mask[i, :len(seq[i])] = torch.tensor(own[i], dtype=torch.bool)
        logprobs[i, :len(seq[i])] = torch.tensor(lps[i])
    prompt_mask = torch.arange(Tp) >= Tp - torch.tensor([len(o) for o in opening])[:, None]  # (N, Tp)
    ro = Rollout(prompt_ids.to(dev), prompt_mask.to(dev), completion_ids.to(dev), mask.to(dev),
                 mask.sum(1).to(dev), torch.tensor(stopped, device=dev), logprobs.to(dev), group_size)
    # the texts without each episode's final stop token, as evaluate.completion_texts drops a completion's
    return ro, [tok.decode(s[:len(s) - int(bool(s) and s[-1] in tok.stop_ids and f)]) for s, f in zip(seq, own_last)]
