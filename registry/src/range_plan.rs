//! Planning range reads: ranges of one blob that lie close together are
//! fetched as one span (one request) and the span is cut back into the
//! ranges asked for. Used by [`crate::RegistryBlobStore::read_ranges`].

/// One request's worth of ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedSpan {
    pub offset: u64,
    pub len: u64,
    /// Indices of the input ranges this span covers.
    pub members: Vec<usize>,
}

/// Groups `ranges` (offset, length) into spans: sorted by offset, a range
/// joins the current span if it starts at most `gap` bytes after the
/// span's end (overlaps included) and the span stays within `max_span`
/// bytes (a single larger range is a span of its own).
pub fn merge_ranges(ranges: &[(u64, u64)], gap: u64, max_span: u64) -> Vec<MergedSpan> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| (ranges[i].0, ranges[i].1));
    let mut spans: Vec<MergedSpan> = Vec::new();
    for i in order {
        let (offset, len) = ranges[i];
        let end = offset.saturating_add(len);
        if let Some(span) = spans.last_mut() {
            let span_end = span.offset + span.len;
            let new_end = span_end.max(end);
            if offset <= span_end.saturating_add(gap) && new_end - span.offset <= max_span {
                span.len = new_end - span.offset;
                span.members.push(i);
                continue;
            }
        }
        spans.push(MergedSpan { offset, len, members: vec![i] });
    }
    spans
}

/// Cuts range `(offset, len)` out of the bytes of `span`.
pub fn slice_of(span: &MergedSpan, data: &[u8], offset: u64, len: u64) -> Option<Vec<u8>> {
    let start = usize::try_from(offset.checked_sub(span.offset)?).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    data.get(start..end).map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_near_ranges() {
        let ranges = [(1000, 100), (0, 100), (150, 50), (100_000, 10), (1100, 0), (1050, 100)];
        let spans = merge_ranges(&ranges, 1000, 1 << 20);
        assert_eq!(spans.len(), 2);
        assert_eq!((spans[0].offset, spans[0].len), (0, 1150));
        assert_eq!(spans[0].members, vec![1, 2, 0, 5, 4]);
        assert_eq!((spans[1].offset, spans[1].len), (100_000, 10));
        let data: Vec<u8> = (0..1150u32).map(|i| i as u8).collect();
        assert_eq!(slice_of(&spans[0], &data, 1000, 100).unwrap(), data[1000..1100].to_vec());
        // gap 0: only touching ranges merge.
        assert_eq!(merge_ranges(&[(0, 10), (10, 10), (21, 1)], 0, 100).len(), 2);
        // span cap.
        assert_eq!(merge_ranges(&[(0, 60), (60, 60)], 0, 100).len(), 2);
        assert_eq!(merge_ranges(&[(0, 500)], 0, 100).len(), 1);
    }
}
