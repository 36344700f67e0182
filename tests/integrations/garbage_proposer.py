"""An adversarial proposer for vLLM: full-length drafts of random tokens every step (tests/integrations)."""

import numpy as np

from draftwise.integrations.vllm import Proposer


class GarbageProposer(Proposer):
    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        rng = np.random.default_rng(int(num_tokens_no_spec[: len(sampled_token_ids)].sum()))
        return [rng.integers(0, 49152, size=self.k).tolist() if s else [] for s in sampled_token_ids]
