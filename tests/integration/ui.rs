//! Compile-time checking: `ui/pass` must compile, each `ui/fail` file must fail with the
//! message in its `.stderr` (regenerate with `TRYBUILD=overwrite`, then read the diff).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/fail/*.rs");
}
