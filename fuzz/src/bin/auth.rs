//! Fuzz target `auth`: see `naiad_fuzz::auth`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        naiad_fuzz::auth(data);
    });
}
