from gateway import tokens


def test_new_token_verifies_and_stores_only_a_digest():
    new = tokens.new_token()
    token_id, secret = tokens.split_token(new.token)
    assert token_id == new.token_id
    assert secret not in new.token_id and new.digest != secret.encode()
    assert tokens.secret_matches(secret, new.digest)


def test_wrong_secret_or_unknown_id_fails():
    new = tokens.new_token()
    other = tokens.new_token()
    _, secret = tokens.split_token(other.token)
    assert not tokens.secret_matches(secret, new.digest)
    assert not tokens.secret_matches(secret, None)


def test_malformed_tokens_are_not_split():
    for text in ["", "abc", "0123456789abcdef", "0123456789abcdef." + "a" * 42, "x" * 60]:
        assert tokens.split_token(text) is None


def test_tokens_are_unique():
    assert len({tokens.new_token().token for _ in range(200)}) == 200
