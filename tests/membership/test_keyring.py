"""memberlist's keyring: AES-GCM payloads, key rotation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.membership.keyring import Keyring
from imgproxy.membership.wire import WireError

K1, K2, K3 = b"1" * 16, b"2" * 24, b"3" * 32


class KeyringTests(SynchronousTestCase):
    """The primary key encrypts; every installed key decrypts."""

    def test_first_key_is_primary_unless_one_is_named(self) -> None:
        self.assertEqual(Keyring([K1, K2]).primary_key, K1)
        self.assertEqual(Keyring([K1, K2], primary=K2).keys, (K2, K1))
        self.assertEqual(Keyring([], primary=K3).keys, (K3,))

    def test_duplicate_keys_are_installed_once(self) -> None:
        self.assertEqual(Keyring([K1, K1, K2, K1]).keys, (K1, K2))

    def test_invalid_key_sizes_and_empty_rings_are_refused(self) -> None:
        for bad in (b"", b"x" * 15, b"x" * 17, b"x" * 33):
            with self.assertRaises(ValueError):
                Keyring([bad])
        with self.assertRaises(ValueError):
            Keyring([])

    def test_any_installed_key_decrypts(self) -> None:
        sealed = Keyring([K2]).encrypt(b"hello", 1)
        self.assertEqual(Keyring([K1, K2, K3]).decrypt(sealed), b"hello")
        with self.assertRaises(WireError):
            Keyring([K1, K3]).decrypt(sealed)

    def test_rotation_add_use_remove(self) -> None:
        old = Keyring([K1])
        staged = old.add_key(K2)
        self.assertEqual(staged.primary_key, K1)
        rotated = staged.use_key(K2)
        self.assertEqual(rotated.keys, (K2, K1))
        sealed_by_new = rotated.encrypt(b"m", 1)
        self.assertEqual(staged.decrypt(sealed_by_new), b"m")  # peers mid-rotation still read it
        with self.assertRaises(WireError):
            old.decrypt(sealed_by_new)
        final = rotated.remove_key(K1)
        self.assertEqual(final.keys, (K2,))
        with self.assertRaises(WireError):
            final.decrypt(old.encrypt(b"m", 1))

    def test_rotation_guards(self) -> None:
        ring = Keyring([K1, K2])
        with self.assertRaises(ValueError):
            ring.use_key(K3)
        with self.assertRaises(ValueError):
            ring.remove_key(K1)
        self.assertEqual(ring.remove_key(K3), ring)  # removing an absent key is a no-op

    def test_keyrings_are_values_that_never_show_their_keys(self) -> None:
        self.assertEqual(Keyring([K1, K2]), Keyring([K2, K1], primary=K1))
        self.assertEqual(hash(Keyring([K1])), hash(Keyring([K1])))
        self.assertNotIn("111", repr(Keyring([K1])))


class PayloadFormatTests(SynchronousTestCase):
    """The byte layout of memberlist's encrypted payloads."""

    def test_version_one_layout(self) -> None:
        nonce = bytes(range(12))
        sealed = Keyring([K1]).encrypt(b"abc", 1, nonce=nonce)
        self.assertEqual(sealed[0], 1)
        self.assertEqual(sealed[1:13], nonce)
        self.assertEqual(len(sealed), 1 + 12 + 3 + 16)

    def test_version_zero_pads_to_whole_blocks(self) -> None:
        for size, padded in ((0, 16), (3, 16), (15, 16), (16, 32), (17, 32)):
            sealed = Keyring([K1]).encrypt(b"x" * size, 0)
            self.assertEqual(sealed[0], 0)
            self.assertEqual(len(sealed), 1 + 12 + padded + 16)
            self.assertEqual(Keyring([K1]).decrypt(sealed), b"x" * size)

    def test_nonces_are_random(self) -> None:
        ring = Keyring([K1])
        self.assertNotEqual(ring.encrypt(b"m", 1)[1:13], ring.encrypt(b"m", 1)[1:13])

    def test_extra_data_is_authenticated(self) -> None:
        ring = Keyring([K1])
        sealed = ring.encrypt(b"m", 1, b"label")
        self.assertEqual(ring.decrypt(sealed, b"label"), b"m")
        with self.assertRaises(WireError):
            ring.decrypt(sealed, b"other")
        with self.assertRaises(WireError):
            ring.decrypt(sealed)

    def test_tampering_is_detected(self) -> None:
        ring = Keyring([K1])
        sealed = bytearray(ring.encrypt(b"message", 1))
        for index in (1, 13, len(sealed) - 1):
            tampered = bytearray(sealed)
            tampered[index] ^= 0x01
            with self.assertRaises(WireError):
                ring.decrypt(bytes(tampered))

    def test_short_empty_and_unknown_version_payloads_are_refused(self) -> None:
        ring = Keyring([K1])
        for bad in (b"", b"\x01" + bytes(27), b"\x00" + bytes(43), b"\x02" + bytes(60)):
            with self.assertRaises(WireError):
                ring.decrypt(bad)

    def test_bad_encrypt_arguments(self) -> None:
        with self.assertRaises(ValueError):
            Keyring([K1]).encrypt(b"m", 2)
        with self.assertRaises(ValueError):
            Keyring([K1]).encrypt(b"m", 1, nonce=b"short")

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=200), st.sampled_from([0, 1]), st.binary(max_size=20))
    def test_round_trip(self, plain: bytes, version: int, extra: bytes) -> None:
        ring = Keyring([K3])
        self.assertEqual(ring.decrypt(ring.encrypt(plain, version, extra), extra), plain)

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=120))
    def test_random_bytes_only_ever_raise_wire_error(self, data: bytes) -> None:
        try:
            Keyring([K1, K2]).decrypt(data)
        except WireError:
            pass
