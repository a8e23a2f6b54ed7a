"""gguf_finetune.stdcpp against libstdc++ itself (compiled with g++ when present) and the llama.cpp fixture."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from gguf_finetune.errors import UserError
from gguf_finetune.stdcpp import (
    MT19937,
    NormalDistributionF32,
    canonical_float_from_u32,
    hash_bytes,
    hash_combine,
    hash_string,
    llamacpp_randomize_normal,
    mt19937_seed_to_state,
    polar_mult,
    polar_mult_ref,
)

FIXTURE = "fixtures/llamacpp-tiny"

# -- pure-Python facts -------------------------------------------------------------------------------


def test_mt19937_known_values():
    # the C++ standard requires the 10000th output of a default-constructed mt19937 to be 4123659995
    g = MT19937()
    assert int(g.generate(10000)[-1]) == 4123659995


def test_generate_matches_scalar_calls_across_twists():
    a, b = MT19937(12345), MT19937(12345)
    bulk = a.generate(2000)
    single = np.array([b() for _ in range(2000)], dtype=np.uint32)
    assert np.array_equal(bulk, single)
    assert a == b and a.state_string() == b.state_string()


def test_state_string_roundtrip_mid_block():
    g = MT19937(99)
    g.generate(1000)  # position 376 inside the second block
    s = g.state_string()
    assert s.split()[-1] == "376" and len(s.split()) == 625
    h = MT19937.from_state_string(s)
    assert h.state_string() == s
    assert np.array_equal(g.generate(700), h.generate(700))


@pytest.mark.parametrize("bad", ["", "1 2 3", " ".join(["1"] * 624) + " 625", " ".join(["x"] * 625),
                                 " ".join(["4294967296"] * 624) + " 0"])
def test_state_string_rejects_garbage(bad):
    with pytest.raises(UserError):
        MT19937.from_state_string(bad)


def test_canonical_float_edges():
    u = np.array([0, 1, 2**31, 2**32 - 129, 2**32 - 128, 2**32 - 1], dtype=np.uint32)
    c = canonical_float_from_u32(u)
    assert c.dtype == np.float32
    assert c[0] == 0.0 and c[2] == 0.5
    assert np.all(c < 1.0)  # values that round to 1.0 become nextafter(1, 0)
    assert c[-1] == np.nextafter(np.float32(1), np.float32(0))


def test_normal_sample_in_pieces_equals_in_one_go():
    g1, g2 = MT19937(5), MT19937(5)
    d1, d2 = NormalDistributionF32(), NormalDistributionF32()
    whole = d1.sample(g1, 1001)
    parts = np.concatenate([d2.sample(g2, k) for k in (1, 2, 3, 500, 495)])
    assert np.array_equal(whole, parts)
    assert g1 == g2  # same number of engine draws consumed
    assert abs(float(whole.mean())) < 0.1 and abs(float(whole.std()) - 1.0) < 0.1


def test_polar_mult_fast_equals_libm_reference():
    r2 = np.random.default_rng(0).random(20000).astype(np.float32)
    r2 = r2[r2 > 0]
    assert np.array_equal(polar_mult(r2), polar_mult_ref(r2))


def test_hash_combine_and_bytes():
    assert hash_combine(0, 1) == 2
    assert hash_combine(1, 1 << 63) == 1  # the shifted-out bit is lost on 64-bit size_t
    assert hash_string("abc") == hash_bytes(b"abc")
    assert len({hash_bytes(bytes(range(n))) for n in range(20)}) == 20


# -- the llama.cpp fixture --------------------------------------------------------------------------


def _fixture_rng_state(testdata, name):
    from gguf_finetune.gguf_io import open_gguf

    f = open_gguf(testdata / FIXTURE / name, "checkpoint")
    return f.get_str("training.shuffle.rng_state")


@pytest.mark.parametrize("name", ["chk-tiny-4.gguf", "chk-tiny-10.gguf"])
def test_fixture_rng_state_is_seed_7(testdata, name):
    # runs were seeded with --seed 7 and never finished an epoch: the stored state is mt19937(7)'s
    s = _fixture_rng_state(testdata, name)
    assert s == mt19937_seed_to_state(7)
    assert MT19937.from_state_string(s).state_string() == s


def test_fixture_lora_init_is_llamacpp_normal(testdata):
    """chk-tiny-4's lora_a tensors are the seed-7 init moved by 3 small Adam steps (alpha 0.02)."""
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.optim import llamacpp_file_order

    f = open_gguf(testdata / FIXTURE / "chk-tiny-4.gguf", "checkpoint")
    names = [n for n in llamacpp_file_order(2) if n.endswith("lora_a")]
    shapes = [tuple(int(x) for x in f.tensor(n).shape.tolist()) for n in names]
    got = np.concatenate([np.asarray(f.tensor(n).data, dtype=np.float32).ravel() for n in names])
    ours = np.concatenate([a.ravel() for a in llamacpp_randomize_normal(7, shapes)])
    other = np.concatenate([a.ravel() for a in llamacpp_randomize_normal(8, shapes)])
    # measured: max |diff| 0.0290, corr 0.95 (seed 8: corr ~0)
    assert np.abs(got - ours).max() < 0.04
    assert np.corrcoef(got, ours)[0, 1] > 0.9
    assert abs(np.corrcoef(got, other)[0, 1]) < 0.2


# -- cross-check with libstdc++ ---------------------------------------------------------------------

CPP = r"""
#include <random>
#include <sstream>
#include <iostream>
#include <vector>
#include <algorithm>
#include <functional>
#include <string>
#include <cstdio>
int main() {
    std::string line;
    std::getline(std::cin, line);                       // a state string to read with operator>>
    std::mt19937 r; { std::stringstream s(line); s >> r; }
    std::cout << r() << " " << r() << "\n";
    std::mt19937 g(7); for (int i = 0; i < 1000; ++i) g();
    { std::stringstream s; s << g; std::cout << s.str() << "\n"; }
    // llama.cpp shuffle_samples on 488 samples of sizes (i*7)%40
    std::mt19937 sh(7); size_t n = 488; std::vector<unsigned> rnd(n); std::vector<size_t> idx(n);
    for (unsigned i = 0; i < n; ++i) { idx[i] = i; rnd[i] = sh(); }
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b){ return rnd[a]==rnd[b] ? a<b : rnd[a]<rnd[b]; });
    for (unsigned i = 0; i < n; ++i) {
        size_t size = (idx[i]*7)%40;
        size_t off = (size_t) ((size - 1) * ((double) sh() / (double) (sh.max()-1)));
        std::cout << idx[i] << ":" << (size ? off : 0) << " ";
    }
    std::cout << "\n";
    { std::stringstream s; s << sh; std::cout << s.str() << "\n"; }
    std::mt19937 q(123); std::normal_distribution<float> nd(0.0f, 1.0f);
    for (int i = 0; i < 20001; ++i) printf("%.9g ", nd(q));
    printf("\n");
    std::mt19937 c(9);
    for (int i = 0; i < 1000; ++i) printf("%.9g ", std::generate_canonical<float, 24>(c));
    printf("\n");
    std::string s;
    for (int len = 0; len < 40; ++len) { std::cout << std::hash<std::string>{}(s) << " "; s.push_back((char)(len*37+200)); }
    std::cout << std::hash<std::string>{}(std::string("train.txt")) << "\n";
}
"""


@pytest.fixture(scope="module")
def cpp_out(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("optional: g++ not installed (the C++ reference needs a compiler)")
    d = tmp_path_factory.mktemp("cpp")
    (d / "x.cpp").write_text(CPP)
    subprocess.run([gxx, "-O1", "-o", str(d / "x"), str(d / "x.cpp")], check=True)
    g = MT19937(31337)
    g.generate(111)
    state = g.state_string()
    out = subprocess.run([str(d / "x")], input=state + "\n", capture_output=True, text=True, check=True).stdout
    return g, out.split("\n")


def test_cpp_operator_in_reads_our_string(cpp_out):
    g, lines = cpp_out
    assert [int(x) for x in lines[0].split()] == [g(), g()]


def test_cpp_state_string_after_draws(cpp_out):
    _, lines = cpp_out
    g = MT19937(7)
    g.generate(1000)
    assert lines[1] == g.state_string()


def test_cpp_llamacpp_shuffle(cpp_out):
    from gguf_finetune.data.batches import shuffle_samples

    _, lines = cpp_out
    n = 488
    sizes = (np.arange(n) * 7) % 40
    begins = np.cumsum(np.concatenate([[0], sizes[:-1]]))
    sh = shuffle_samples(mt19937_seed_to_state(7), begins, sizes)
    pairs = [tuple(int(v) for v in p.split(":")) for p in lines[2].split()]
    idx = np.array([p[0] for p in pairs])
    assert np.array_equal(sh.begins, begins[idx]) and np.array_equal(sh.sizes, sizes[idx])
    assert np.array_equal(sh.offs, [p[1] for p in pairs])
    assert sh.rng_state_next == lines[3]


def test_cpp_normal_distribution(cpp_out):
    _, lines = cpp_out
    want = np.array([float(x) for x in lines[4].split()], dtype=np.float32)
    got = NormalDistributionF32().sample(MT19937(123), len(want))
    assert np.array_equal(got, want)


def test_cpp_generate_canonical(cpp_out):
    _, lines = cpp_out
    want = np.array([float(x) for x in lines[5].split()], dtype=np.float32)
    assert np.array_equal(canonical_float_from_u32(MT19937(9).generate(len(want))), want)


def test_cpp_hash(cpp_out):
    _, lines = cpp_out
    want = [int(x) for x in lines[6].split()]
    s = b""
    got = []
    for n in range(40):
        got.append(hash_bytes(s))
        s += bytes([(n * 37 + 200) & 0xFF])
    got.append(hash_string("train.txt"))
    assert got == want
