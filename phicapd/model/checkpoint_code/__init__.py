"""Python files a checkpoint carries for other runtimes (``trust_remote_code``), never imported by
phicapd itself at run time: ``make_test_model(processor_code=True)`` copies them into the
checkpoint so that vLLM, which loads a ``phi3_v`` checkpoint's processor as remote code, can serve
the test checkpoint. The processor is phicapd's own (``model/processing.py`` and the tokenizer
rules of ``model/tokenizer.py``), written against the published interface, not Microsoft's file."""
