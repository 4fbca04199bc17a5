"""The math verifier: strict prediction, lenient gold, and no reward (None) on a deadline."""

import pytest

from reward.math import MathVerifier, _verify_in_worker, extract_answer, extract_boxed


def test_extraction_takes_the_last_balanced_box() -> None:
    assert extract_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_answer("so #### 1,234", allow_hashes=True) == "1234"
    assert extract_answer("so #### 1,234") is None


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(workers=1, deadline_s=5.0)
    yield v
    v.close()


@pytest.mark.parametrize(
    ("prediction", "gold", "reward"),
    [
        (r"\boxed{68}", "68", 1.0),
        (r"\boxed{67}", "68", 0.0),
        ("68", "68", 0.0),  # no final boxed answer: strict on the prediction
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
        (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
        (r"\boxed{36}", r"\$36", 1.0),
        (r"\boxed{-1}", "-1", 1.0),
        # An integer gold answer is met exactly: no float near it passes, other scripts' digits neither.
        (r"\boxed{1e9}", "1000000007", 0.0),
        (r"\boxed{1000000006.9999999}", "1000000007", 0.0),
        (r"\boxed{1000000007.0}", "1000000007", 1.0),
        ("\\boxed{\u0661\u0662\u0663}", "123", 0.0),
        ("\\boxed{\uff11\uff12\uff13}", "123", 0.0),
    ],
)
def test_verdicts(verifier: MathVerifier, prediction: str, gold: str, reward: float) -> None:
    assert verifier.verify_sync(prediction, gold).reward == reward


def test_deadline_gives_no_reward_and_the_pool_survives() -> None:
    v = MathVerifier(workers=1, deadline_s=0.5)
    try:
        slow = v.verify_sync(r"\boxed{10^{10^{10^{10}}}}", "5")  # sympy evaluates the power tower
        assert slow.reward is None and "deadline" in slow.error
        assert v.verify_sync(r"\boxed{2}", "2").reward == 1.0
    finally:
        v.close()


@pytest.mark.parametrize(
    ("answer", "gold"),
    [("68", "68"), ("67", "68"), ("-1", "-1"), ("1", "-1"), ("007", "7"), ("0", "-0"), (" 12", "12")],
)
def test_integer_answers_are_judged_on_the_host_as_math_verify_would(answer: str, gold: str) -> None:
    v = MathVerifier(workers=1)
    v._pool.stop()  # a verdict that needed the pool would now fail with an error
    try:
        verdict = v.verify_sync(rf"\boxed{{{answer}}}", gold)
        assert verdict.error is None
        assert verdict.reward == float(_verify_in_worker(answer, gold))
    finally:
        v.close()
