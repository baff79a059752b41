from keyrotor import KeyManager


async def test_round_trip(km: KeyManager) -> None:
    token = await km.encrypt("anthropic", "sk-ant-xyz", context="user:1")
    assert token.startswith("kr1:1:")
    assert await km.decrypt("anthropic", token, context="user:1") == "sk-ant-xyz"
    await km.put_secret("openai", "prod", "sk-abc")
    assert await km.get_secret("openai", "prod") == "sk-abc"
