import hashlib
import os

from gateway import tokens


def test_new_token_verifies_and_only_a_stored_key_is_kept():
    new = tokens.new_token()
    token_id, secret = tokens.split_token(new.token)
    assert token_id == new.token_id
    assert secret.encode() not in new.digest and new.digest != hashlib.sha256(new.token.encode()).digest()
    assert tokens.token_matches(new.token, new.digest)


def test_wrong_token_or_unknown_id_fails():
    new, other = tokens.new_token(), tokens.new_token()
    assert not tokens.token_matches(other.token, new.digest)
    assert not tokens.token_matches(new.token, None)


def test_malformed_tokens_are_not_split():
    for text in ["", "abc", "0123456789abcdef", "0123456789abcdef." + "a" * 42, "x" * 60]:
        assert tokens.split_token(text) is None


def test_tokens_are_unique():
    assert len({tokens.new_token().token for _ in range(200)}) == 200


def test_auth_proof_checks_against_the_stored_key():
    new = tokens.new_token()
    nonce = os.urandom(32)
    proof = tokens.auth_proof(new.token, nonce, "truck-17")
    assert len(proof) == 32
    assert tokens.proof_matches(proof, new.digest, nonce, "truck-17")
    assert not tokens.proof_matches(proof, new.digest, os.urandom(32), "truck-17")  # replay on a new nonce
    assert not tokens.proof_matches(proof, new.digest, nonce, "truck-18")  # another device's name
    assert not tokens.proof_matches(proof, tokens.new_token().digest, nonce, "truck-17")
    assert not tokens.proof_matches(proof, None, nonce, "truck-17")
    assert not tokens.proof_matches(proof[:31], new.digest, nonce, "truck-17")


def test_the_stored_key_alone_cannot_make_a_proof():
    """Someone with a copy of the database knows stored_key, not client_key."""
    new = tokens.new_token()
    nonce = os.urandom(32)
    forged = tokens.auth_proof(new.digest.hex(), nonce, "truck-17")  # best guess without the token
    assert not tokens.proof_matches(forged, new.digest, nonce, "truck-17")
