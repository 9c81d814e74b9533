"""The /image query: every rule of the contract's parameter table."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.errors import ProxyError
from imgproxy.params import (
    TransformSpec,
    check_source_url,
    negotiate_format,
    parse_image_query,
    parse_purge_query,
    sign_query,
    spec_from_values,
)

SOURCE = "https://images.example.com/photo.jpg"
Q = "url=" + quote(SOURCE, safe="")


def parse(query: str, accept: str | None = None, key: bytes | None = None):
    return parse_image_query(query.encode(), accept, key)


class ParseImageQueryTests(SynchronousTestCase):
    def assertRefused(self, query: str, status: int = 400, key: bytes | None = None) -> str:
        with self.assertRaises(ProxyError) as caught:
            parse(query, key=key)
        self.assertEqual(caught.exception.status, status)
        return caught.exception.reason

    def test_url_alone_keeps_every_default(self) -> None:
        spec = parse(Q).spec
        self.assertEqual(spec, TransformSpec(url=SOURCE))
        self.assertEqual((spec.fit, spec.output_format, spec.quality), ("contain", None, 80))

    def test_all_parameters(self) -> None:
        spec = parse(Q + "&w=320&h=200&fit=cover&format=webp&q=55").spec
        self.assertEqual(spec, TransformSpec(SOURCE, 320, 200, "cover", "webp", 55))

    def test_missing_url(self) -> None:
        self.assertIn("url", self.assertRefused("w=10"))

    def test_urls_that_are_not_absolute_http(self) -> None:
        for url in ["", "ftp://x/y.jpg", "/relative.jpg", "file:///etc/passwd", "http://",
                    "javascript:alert(1)", "http://a b/", "http://x:99999/", "gopher://x/"]:
            with self.subTest(url=url):
                self.assertRefused("url=" + quote(url, safe=""))

    def test_a_backslash_before_the_path_is_refused_not_read_as_python_reads_it(self) -> None:
        # A browser fetches 127.0.0.1 for this URL; Python's parser says evil.test.
        for url in ("http://127.0.0.1:8080\\@evil.test/a.jpg", "http://a\\b/c.jpg",
                    "http://127.0.0.1:8080\\f/a.jpg"):
            with self.subTest(url=url):
                self.assertIn("backslash", self.assertRefused("url=" + quote(url, safe="")))

    def test_a_url_checked_again_is_answered_from_memory_and_a_bad_one_refused_again(
        self,
    ) -> None:
        url = "HTTP://Origin.test:80/a/./remembered.jpg"
        first = check_source_url(url)
        hits = check_source_url.cache_info().hits
        self.assertEqual(check_source_url(url), first)
        self.assertEqual(check_source_url.cache_info().hits, hits + 1)
        for _ in range(2):
            with self.assertRaises(ProxyError):
                check_source_url("http://a b/")

    def test_dimensions_range(self) -> None:
        for bad in ["0", "8193", "-1", "abc", "1.5", "", " 5", "+5", "99999999", "１２"]:
            with self.subTest(w=bad):
                self.assertRefused(Q + "&w=" + quote(bad))
                self.assertRefused(Q + "&h=" + quote(bad))
        self.assertEqual(parse(Q + "&w=1&h=8192").spec.height, 8192)

    def test_quality_range(self) -> None:
        for bad in ["0", "101", "x", ""]:
            with self.subTest(q=bad):
                self.assertRefused(Q + "&q=" + bad)
        self.assertEqual(parse(Q + "&q=1").spec.quality, 1)
        self.assertEqual(parse(Q + "&q=100").spec.quality, 100)

    def test_fit_and_format_values(self) -> None:
        self.assertIn("contain", self.assertRefused(Q + "&fit=stretch"))
        self.assertIn("avif", self.assertRefused(Q + "&format=bmp"))
        self.assertIn("auto", self.assertRefused(Q + "&format="))

    def test_format_and_fit_read_as_users_of_other_proxies_type_them(self) -> None:
        # "jpg" is thumbor's and darthsim's spelling; letter case is not a different format.
        canonical = parse(Q + "&format=jpeg&fit=cover").spec
        for query in ["&format=jpg&fit=cover", "&format=JPEG&fit=Cover", "&format=JPG&fit=COVER"]:
            with self.subTest(query=query):
                spec = parse(Q + query).spec
                self.assertEqual((spec.output_format, spec.fit), ("jpeg", "cover"))
                self.assertEqual(spec.cache_key, canonical.cache_key)
        self.assertTrue(parse(Q + "&format=AUTO", accept="image/webp").varies_on_accept)
        self.assertRefused(Q + "&format=jpe")

    def test_repeated_and_unknown_parameters(self) -> None:
        self.assertIn("more than once", self.assertRefused(Q + "&w=1&w=2"))
        self.assertIn("unknown parameter 'width'", self.assertRefused(Q + "&width=3"))
        # Unprintable names are escaped as text, never shown as Python bytes.
        self.assertEqual(self.assertRefused(Q + "&w%00=3"), "unknown parameter 'w\\x00'")
        self.assertTrue(self.assertRefused(Q + "&" + "x" * 60 + "=1").endswith("'..."))

    def test_invalid_utf8_is_a_400(self) -> None:
        self.assertRefused(Q + "&fit=%ff%fe")

    def test_spellings_of_one_source_are_one_source(self) -> None:
        # What reaches the origin as the same request is one cache key and one purge.
        canonical = "http://origin.test/a/b.jpg"
        for spelling in [
            "HTTP://ORIGIN.test/a/b.jpg",
            "http://origin.test:80/a/b.jpg",
            "http://origin.test/a/b.jpg#top",
            "http://origin.test/a/b.jpg?",
            "http://user:secret@origin.test/a/b.jpg",
            "http://origin.test/a/./b.jpg",
            "http://origin.test/a/x/../b.jpg",
            "http://origin.test/../a/b.jpg",
            "http://origin.test/%61/b.jpg",
            "http://origin.test/%2e/a/b.jpg",
            "http://origin.test/a/%2E%2E/a/b.jpg",
        ]:
            with self.subTest(spelling=spelling):
                self.assertEqual(check_source_url(spelling), canonical)
                self.assertEqual(parse("url=" + quote(spelling, safe="")).spec.source_key,
                                 parse("url=" + quote(canonical, safe="")).spec.source_key)

    def test_escapes_and_international_text_have_one_spelling(self) -> None:
        self.assertEqual(check_source_url("https://bücher.test:443/ä%20b?q=%7e&r=ü"),
                         "https://xn--bcher-kva.test/%C3%A4%20b?q=~&r=%C3%BC")
        self.assertEqual(check_source_url("http://[::FFFF:1.2.3.4]:8080"),
                         "http://[::ffff:102:304]:8080/")
        self.assertEqual(check_source_url("http://[FE80::1%25eth0]/a"),
                         "http://[fe80::1%25eth0]/a")

    def test_different_sources_stay_different(self) -> None:
        urls = ["http://o.test/a", "http://o.test/a/", "http://o.test//a", "http://o.test/A",
                "http://o.test/a?x=1", "http://o.test/a?x=1&y", "https://o.test/a",
                "http://o.test:8080/a", "http://o.test/a%2Fb", "http://o.test/a/b"]
        self.assertEqual(len({check_source_url(url) for url in urls}), len(urls))
        for url in urls:  # already canonical: unchanged
            self.assertEqual(check_source_url(url), url)

    def test_a_url_that_is_not_text_is_a_400(self) -> None:
        # Only JSON can carry a lone surrogate (the internal API's POST body).
        with self.assertRaises(ProxyError) as caught:
            check_source_url("http://origin.test/\ud800.jpg")
        self.assertEqual(caught.exception.status, 400)

    def test_order_and_explicit_defaults_do_not_split_the_cache(self) -> None:
        a = parse(Q + "&w=100&h=50").spec
        b = parse("h=50&w=100&" + Q + "&fit=contain&q=80").spec
        self.assertEqual(a.cache_key, b.cache_key)
        self.assertNotEqual(a.cache_key, parse(Q + "&w=100&h=51").spec.cache_key)

    def test_quality_does_not_split_lossless_formats(self) -> None:
        self.assertEqual(
            parse(Q + "&format=png&q=10").spec.cache_key,
            parse(Q + "&format=png&q=90").spec.cache_key,
        )
        self.assertNotEqual(
            parse(Q + "&format=webp&q=10").spec.cache_key,
            parse(Q + "&format=webp&q=90").spec.cache_key,
        )

    def test_variants_of_one_source_share_the_source_key(self) -> None:
        a, b = parse(Q + "&w=10").spec, parse(Q + "&w=20").spec
        self.assertEqual(a.source_key, b.source_key)
        self.assertTrue(a.cache_key.startswith(a.source_key + "/"))


class AutoFormatTests(SynchronousTestCase):
    def test_avif_then_webp_then_source(self) -> None:
        self.assertEqual(negotiate_format("image/avif,image/webp,*/*"), "avif")
        self.assertEqual(negotiate_format("image/webp,*/*;q=0.8"), "webp")
        self.assertIsNone(negotiate_format("image/png,*/*"))
        self.assertIsNone(negotiate_format(None))
        self.assertEqual(negotiate_format("image/avif;q=0, image/webp"), "webp")

    def test_auto_varies_on_accept_and_shares_the_explicit_key(self) -> None:
        auto = parse(Q + "&format=auto", accept="image/webp")
        self.assertTrue(auto.varies_on_accept)
        self.assertEqual(auto.spec.cache_key, parse(Q + "&format=webp").spec.cache_key)
        self.assertFalse(parse(Q + "&format=webp").varies_on_accept)


class SignatureTests(SynchronousTestCase):
    key = b"s3cret"

    def assertRefused(self, query: str, status: int, key: bytes) -> None:
        with self.assertRaises(ProxyError) as caught:
            parse(query, key=key)
        self.assertEqual(caught.exception.status, status)

    def signed(self, query: str) -> str:
        digest = hmac.new(self.key, query.encode(), hashlib.sha256).hexdigest()
        return f"{query}&sig={digest}"

    def test_valid_signature_accepted(self) -> None:
        self.assertEqual(parse(self.signed(Q + "&w=5"), key=self.key).spec.width, 5)

    def test_sig_may_stand_anywhere(self) -> None:
        query = Q + "&w=5"
        sig = sign_query(query.encode(), self.key)
        self.assertEqual(parse(f"sig={sig}&{query}", key=self.key).spec.width, 5)

    def test_a_query_signed_as_sent_with_its_empty_parts_is_accepted(self) -> None:
        # "The query string without sig": a client that signed "…&w=5&" and then
        # appended "sig=…", or left "&&" in, signed the same parameters.
        query = Q + "&w=5&"
        digest = hmac.new(self.key, query.encode(), hashlib.sha256).hexdigest()
        for sent in (f"{query}sig={digest}", f"{query}&sig={digest}", f"sig={digest}&{query}"):
            with self.subTest(sent=sent):
                self.assertEqual(parse(sent, key=self.key).spec.width, 5)
        gap = Q + "&&w=5"
        digest = hmac.new(self.key, gap.encode(), hashlib.sha256).hexdigest()
        self.assertEqual(parse(f"{Q}&&sig={digest}&w=5", key=self.key).spec.width, 5)
        self.assertEqual(parse(f"{gap}&sig={digest}", key=self.key).spec.width, 5)

    def test_a_signature_as_sent_covers_no_other_parameters(self) -> None:
        digest = hmac.new(self.key, (Q + "&w=5&").encode(), hashlib.sha256).hexdigest()
        for sent in (f"{Q}&w=6&sig={digest}", f"{Q}&w=5&h=1&sig={digest}",
                     f"w=5&{Q}&sig={digest}"):
            with self.subTest(sent=sent):
                self.assertRefused(sent, 403, key=self.key)

    def test_missing_bad_or_reordered_signature_is_403(self) -> None:
        signed = self.signed(Q + "&w=5")
        for query in [Q + "&w=5", signed.replace("w=5", "w=6"), Q + "&w=5&sig=zz",
                      self.signed("w=5&" + Q).replace("w=5&" + Q, Q + "&w=5")]:
            with self.subTest(query=query), self.assertRaises(ProxyError) as caught:
                parse(query, key=self.key)
            self.assertEqual(caught.exception.status, 403)

    def test_signature_ignored_without_a_key(self) -> None:
        self.assertEqual(parse(Q + "&sig=abc").spec.url, SOURCE)

    def test_an_unsigned_request_is_403_whatever_else_is_wrong_with_it(self) -> None:
        # Nothing of an unauthenticated query is judged: not even its names.
        for query in ("bogus=1", Q + "&w=1&w=2", Q + "&fit=%ff", Q + "&w=0", ""):
            with self.subTest(query=query):
                self.assertRefused(query, 403, key=self.key)
                with self.assertRaises(ProxyError) as caught:
                    parse_purge_query(query.encode(), self.key)
                self.assertEqual(caught.exception.status, 403)
        # Once signed, what is wrong is a 400.
        self.assertRefused(self.signed(Q + "&w=0"), 400, key=self.key)

    def test_two_signatures_are_403(self) -> None:
        signed = self.signed(Q)
        self.assertRefused(signed + "&sig=" + signed.rpartition("=")[2], 403, key=self.key)


class PurgeQueryTests(SynchronousTestCase):
    def test_purge_needs_a_signing_key(self) -> None:
        with self.assertRaises(ProxyError) as caught:
            parse_purge_query(Q.encode(), None)
        self.assertEqual(caught.exception.status, 403)

    def test_purge_with_valid_signature(self) -> None:
        sig = sign_query(Q.encode(), b"k")
        self.assertEqual(parse_purge_query(f"{Q}&sig={sig}".encode(), b"k"), SOURCE)

    def test_a_purge_names_the_source_in_any_of_its_spellings(self) -> None:
        query = "url=" + quote("HTTPS://Images.Example.com:443/./photo.jpg#x", safe="")
        sig = sign_query(query.encode(), b"k")
        self.assertEqual(parse_purge_query(f"{query}&sig={sig}".encode(), b"k"), SOURCE)

    def test_purge_with_bad_signature(self) -> None:
        with self.assertRaises(ProxyError) as caught:
            parse_purge_query(f"{Q}&sig=00".encode(), b"k")
        self.assertEqual(caught.exception.status, 403)


class InternalSpecTests(SynchronousTestCase):
    def test_json_round_trip(self) -> None:
        spec = TransformSpec(SOURCE, 10, None, "fill", "avif", 33)
        self.assertEqual(spec_from_values(spec.to_json()), spec)

    def test_json_values_are_validated(self) -> None:
        with self.assertRaises(ProxyError):
            spec_from_values({"url": SOURCE, "w": 0})


class QueryFuzzTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300), st.one_of(st.none(), st.text(max_size=50)))
    def test_any_query_parses_or_is_a_client_error(self, raw: bytes, accept) -> None:
        try:
            parse_image_query(raw, accept, None)
        except ProxyError as e:
            self.assertIn(e.status, (400, 403))

    @settings(max_examples=500, deadline=None)
    @given(
        st.sampled_from(["http", "HTTPS", "Http"]),
        st.sampled_from(["origin.test", "ORIGIN.test:80", "u:p@o.test:8443", "[::1]", "bü.test"]),
        st.text(alphabet="ab./%2Fé ~+?#&=", max_size=40),
    )
    def test_the_canonical_spelling_is_its_own_canonical_spelling(
        self, scheme: str, authority: str, rest: str
    ) -> None:
        try:
            canonical = check_source_url(f"{scheme}://{authority}/{rest}")
        except ProxyError as e:
            self.assertEqual(e.status, 400)
            return
        self.assertEqual(check_source_url(canonical), canonical)
        self.assertTrue(canonical.isascii())
