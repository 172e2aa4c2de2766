use popen::data::{Mask, Rle};

#[test]
fn rle_round_trips_through_compressed_strings() {
    // odd size, several shapes, including runs long enough to need multi-char values
    let m = Mask::from_fn(37, 53, |y, x| {
        (x as i64 - 20).pow(2) + (y as i64 - 15).pow(2) < 120 || (x > 45 && y > 30)
    });
    let r = Rle::from_mask(&m);
    assert_eq!(r.area() as usize, m.area());
    let s = r.to_compressed();
    let back = Rle::from_compressed(37, 53, &s).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.to_mask().unwrap(), m);
}

#[test]
fn rle_matches_hand_worked_example() {
    // 3x2 mask, column-major pixels: col0 = [0,1,1], col1 = [1,0,0] -> runs 1,3,2
    let m = Mask::from_vec(3, 2, vec![0, 1, 1, 0, 1, 0]).unwrap();
    let r = Rle::from_mask(&m);
    assert_eq!(r.counts, vec![1, 3, 2]);
    // first three runs are written as is: 1 -> '1', 3 -> '3', 2 -> '2'
    assert_eq!(r.to_compressed(), "132");
    // from the fourth on, the difference to the run two back: 2 - 5 = -3 -> 29 + 48 = 'M'
    let r = Rle {
        height: 10,
        width: 1,
        counts: vec![2, 5, 1, 2],
    };
    assert_eq!(r.to_compressed(), "251M");
    assert_eq!(Rle::from_compressed(10, 1, "251M").unwrap(), r);
}

#[test]
fn bad_rle_is_an_error() {
    assert!(Rle::from_compressed(3, 3, "1\u{1}").is_err());
    assert!(
        Rle::from_compressed(3, 3, "1a").is_err()
            || Rle::from_compressed(3, 3, "1a").unwrap().to_mask().is_err()
    );
    let r = Rle {
        height: 3,
        width: 3,
        counts: vec![2, 2],
    };
    assert!(r.to_mask().is_err());
}
