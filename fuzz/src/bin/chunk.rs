//! Fuzz target `chunk`: see `naiad_fuzz::chunk`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        naiad_fuzz::chunk(data);
    });
}
