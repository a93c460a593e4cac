"""Reference verdicts for the real-server judge tests, computed another way: the same tiny judge in
transformers, greedy-decoded under the CORRECT/INCORRECT constraint the servers apply."""

from __future__ import annotations

import torch

from services.judge.backends import VERDICT_WORDS

CASES = [("What colour is the car? (A) red (B) blue", "A", "red"),
         ("How many dogs are there?", "3", "There are three dogs."),
         ("What is written on the sign?", "STOP", "It says GO."),
         ("Is the cup left of the plate?", "yes", "no"),
         ("Which animal is on the sofa?", "cat", "a small grey cat")]


def hf_constrained_verdict(judge_dir, messages) -> bool:
    """Greedy decoding restricted to prefixes of the verdict words, in transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(judge_dir)
    model = AutoModelForCausalLM.from_pretrained(judge_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids, text = list(ids), ""
    vocab = {i: tok.decode([i]) for i in range(len(tok))}
    while text not in VERDICT_WORDS:
        allowed = [i for i, s in vocab.items() if s and any(w.startswith(text + s) for w in VERDICT_WORDS)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        best = max(allowed, key=lambda i: float(logits[i]))
        ids.append(best)
        text += vocab[best]
    return text == "CORRECT"
