"""What every OpenAI-compatible server `loft serve` starts must do for the real `openai` client: answer a chat
completion, and stream the same answer token by token. test_serve.py asks llama-server, test_vllm.py vLLM."""

# "What is the capital of France?" alone is a near-tie at the first token for the 135M test model ('The' vs 'L'),
# and the quantized files answer in French; with "Answer in one word." every quant says Paris.
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def check_chat_completion(client, model: str) -> None:
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=32)
    answer = resp.choices[0].message.content
    assert "Paris" in answer, answer
    assert resp.choices[0].finish_reason == "stop" and "<|im_end|>" not in answer
    assert resp.usage.prompt_tokens > 10 and 0 < resp.usage.completion_tokens <= 32


def check_streaming(client, model: str, extra_body: dict | None = None) -> None:
    """Greedy, streamed and whole: the pieces arrive one by one and join to the whole answer."""
    kwargs = dict(model=model, messages=QUESTION, temperature=0, max_tokens=32, extra_body=extra_body)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "tokens arrive incrementally"
    assert "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
