module waystone.test/go_raw

go 1.24
