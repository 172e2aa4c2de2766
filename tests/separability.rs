//! The embedding diagnostic of `popen probe-embeddings` on hand-made cases.
use popen::metrics::separability::separability;

fn item(cat: &str, image: usize, v: &[f32]) -> (String, usize, Vec<f32>) {
    (cat.to_string(), image, v.to_vec())
}

#[test]
fn clustered_categories_are_told_apart() {
    let items = vec![
        item("cup", 0, &[1.0, 0.1, 0.0]),
        item("cup", 1, &[0.9, 0.0, 0.1]),
        item("book", 2, &[0.0, 1.0, 0.1]),
        item("book", 3, &[0.1, 0.9, 0.0]),
        item("lamp", 4, &[0.0, 0.1, 1.0]),
        item("lamp", 5, &[0.1, 0.0, 0.8]),
    ];
    let s = separability(&items);
    assert_eq!((s.items, s.categories), (6, 3));
    assert_eq!(s.nn_accuracy, Some(1.0));
    let (same, diff) = (s.cos_same.unwrap(), s.cos_diff.unwrap());
    assert!(same > 0.98 && diff < 0.2, "{same} {diff}");
    assert!((s.chance - 2.0 / 6.0).abs() < 1e-12);
}

#[test]
fn one_vector_for_every_target_carries_nothing() {
    let items: Vec<_> = ["cup", "book", "lamp", "cup"]
        .iter()
        .enumerate()
        .map(|(i, c)| item(c, i, &[0.3, -0.2, 0.5]))
        .collect();
    let s = separability(&items);
    assert!((s.cos_same.unwrap() - 1.0).abs() < 1e-12);
    assert!((s.cos_diff.unwrap() - 1.0).abs() < 1e-12);
}

#[test]
fn items_of_one_image_are_never_compared() {
    // a and b are one target asked about twice in image 0: were they compared, each
    // would name the other's category.  Among other images, a's and b's nearest is c
    // (another category); c's is a (tie with b: the first); d's is a.
    let items = vec![
        item("cup", 0, &[1.0, 0.0]),
        item("cup", 0, &[1.0, 0.0]),
        item("book", 1, &[1.0, 0.05]),
        item("cup", 2, &[1.0, -0.3]),
    ];
    let s = separability(&items);
    assert_eq!(s.nn_accuracy, Some(0.25));
    // pairs from image 0 are left out of the means too: the only same-category pairs
    // are (a, d) and (b, d)
    let want = 1.0 / (1.0f64 + 0.09).sqrt();
    assert!(
        (s.cos_same.unwrap() - want).abs() < 1e-6,
        "{:?}",
        s.cos_same
    );
}

#[test]
fn too_few_items_give_no_measure() {
    let s = separability(&[item("cup", 0, &[1.0])]);
    assert_eq!((s.cos_same, s.cos_diff, s.nn_accuracy), (None, None, None));
}
