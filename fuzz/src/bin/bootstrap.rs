//! Fuzz target `bootstrap`: see `naiad_fuzz::bootstrap`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        naiad_fuzz::bootstrap(data);
    });
}
