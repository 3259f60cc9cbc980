//! Fuzz target `json`: see `naiad_fuzz::json`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        naiad_fuzz::json(data);
    });
}
