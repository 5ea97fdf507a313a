"""The corpus: the embedded docstring paragraphs split into pretraining, held-out and downstream
streams, the vocabulary, and the noisy pretraining pool (:class:`Corpus`)."""

from __future__ import annotations

from .config import CORPUS_SEED, NOISE_KINDS, LMConfig


_CORPORA: dict = {}


def corpus_for(cfg: LMConfig) -> "Corpus":
    """The :class:`Corpus` of ``cfg`` (built once per process: fitting the vocabulary takes seconds)."""
    key = (cfg.vocab, cfg.seq_len, cfg.n_train)
    if key not in _CORPORA:
        _CORPORA[key] = Corpus(cfg)
    return _CORPORA[key]


class Corpus:
    """Token windows of the embedded corpus (see the module docstring)."""

    def __init__(self, cfg: LMConfig):
        import keras
        import numpy as np
        import tensorflow as tf

        from model_zoo import text
        self.cfg = cfg
        prose, code, domains = text.load_corpus(with_domains=True)
        rng = np.random.default_rng(CORPUS_SEED)
        order = rng.permutation(len(prose))
        n = len(prose)
        parts = {"pretrain": order[:int(0.7 * n)], "heldout": order[int(0.7 * n):int(0.85 * n)],
                 "downstream": order[int(0.85 * n):]}
        self.tv = keras.layers.TextVectorization(max_tokens=cfg.vocab, standardize="lower_and_strip_punctuation",
                                                 split="whitespace", output_mode="int")
        self.tv.adapt(tf.data.Dataset.from_tensor_slices([prose[i] for i in parts["pretrain"]]).batch(256))
        self.vocab_size = len(self.tv.get_vocabulary())
        L = cfg.seq_len + 1

        def stream(idx):
            return np.concatenate([np.asarray(self.tv(prose[i])) for i in idx]).astype(np.int32)

        def wins(ids, stride):
            return np.stack([ids[s:s + L] for s in range(0, len(ids) - L + 1, stride)])
        pre = wins(stream(parts["pretrain"]), 8)
        self.pretrain = pre[rng.permutation(len(pre))]
        self.heldout = wins(stream(parts["heldout"]), 16)
        half = len(parts["downstream"]) // 2
        self.down = {}
        for name, idx in (("train", parts["downstream"][:half]), ("test", parts["downstream"][half:])):
            xs, ys = [], []
            for d in range(len(text.DOMAINS)):   # windows of one domain's paragraphs (never across domains)
                ids = [i for i in idx if domains[i] == d]
                if ids and sum(len(self.tv(prose[i])) for i in ids) >= cfg.seq_len:
                    w = wins(stream(ids), 4)[:, :cfg.seq_len]
                    xs.append(w)
                    ys.append(np.full(len(w), d, np.int64))
            self.down[name] = (np.concatenate(xs), np.concatenate(ys))
        self.domains = tuple(text.DOMAINS)
        code_ids = np.asarray(self.tv(code)).astype(np.int32)
        cw = wins(code_ids, L)
        self.code = cw[rng.permutation(len(cw))]
        if len(self.pretrain) < cfg.n_train:
            raise ValueError(f"the corpus gives {len(self.pretrain)} pretraining windows, n_train={cfg.n_train}")

    @staticmethod
    def jumble(windows, rng):
        out = windows.copy()
        for row in out:
            rng.shuffle(row)
        return out

    def pool(self, kind: str, fraction: float):
        """``(windows [n_train, L], is_noise [n_train])`` for a noise kind and fraction (fixed seed)."""
        import numpy as np
        rng = np.random.default_rng(CORPUS_SEED + 1)
        n = self.cfg.n_train
        base = self.pretrain[:n].copy()
        k = int(round(fraction * n)) if kind != "none" else 0
        noisy = rng.choice(n, size=k, replace=False)
        if kind == "jumbled":
            base[noisy] = self.jumble(base[noisy], rng)
        elif kind == "code":
            base[noisy] = self.code[:k]
        elif kind == "duplicates":
            originals = self.pretrain[n:n + 20]
            base[noisy] = originals[np.arange(k) % len(originals)]
        elif kind != "none":
            raise ValueError(f"unknown noise kind '{kind}'; choose one of {NOISE_KINDS + ('none',)}")
        is_noise = np.zeros(n, bool)
        is_noise[noisy] = True
        return base, is_noise

    def downstream(self):
        """``(x_train, y_train, x_test, y_test)``: ``seq_len``-token windows and their domain index."""
        return (*self.down["train"], *self.down["test"])
