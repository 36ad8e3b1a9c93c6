fn main() {
    println!("ostp: under construction");
}
