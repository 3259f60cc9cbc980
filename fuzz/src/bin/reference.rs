//! Fuzz target `reference`: see `naiad_fuzz::reference`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        naiad_fuzz::reference(data);
    });
}
