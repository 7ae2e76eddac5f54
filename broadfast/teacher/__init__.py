"""The teacher: multi-perspective chain-of-thought labels (MPCoT) over an engine contract
(:mod:`broadfast.teacher.engine`: vLLM over HTTP, or a local transformers model), SFT and DPO of
the local teacher, and its labelling worker (:mod:`broadfast.teacher.worker`)."""
