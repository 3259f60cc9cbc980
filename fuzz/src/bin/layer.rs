//! Fuzz target `layer`: see `naiad_fuzz::layer`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        naiad_fuzz::layer(data);
    });
}
